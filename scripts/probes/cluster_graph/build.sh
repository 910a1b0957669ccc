#!/usr/bin/env bash
# Builds the probe on the device (the CUDA MLX wheel installed, and nanobind 3.1.0: MLX 0.32.4's module
# registers mx.array in nanobind's domain `mlx` under the internals key ..._a1_v22, which 3.x builds share;
# with 2.15 (v21) or without NB_DOMAIN=mlx, mx.array is a foreign type here): the extension cluster_graph, kernels.cu's cubins, and
# (for part D) mhc_dynamic_proj_cluster with its cluster shape given at launch. Output: build/.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p build
NB=$(python3 -c "import nanobind, os; print(os.path.dirname(nanobind.__file__))")
MLX=$(python3 -c "import mlx.core as mx, os; print(os.path.dirname(mx.__file__))")
CUDA=$(dirname "$(dirname "$(command -v nvcc)")")
PYI=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
EXT=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
g++ -O2 -std=c++20 -shared -fPIC -fvisibility=hidden -DNB_DOMAIN=mlx -Ifmt_stub -I"$NB/include" -I"$NB/ext/robin_map/include" -I"$PYI" \
  -I"$MLX/include" -I"$CUDA/include" cluster_graph.cpp "$NB/src/nb_combined.cpp" -L"$MLX/lib" -lmlx \
  -Wl,-rpath,"$MLX/lib" -o "build/cluster_graph$EXT"  # the driver API (cu*) resolves through libmlx's libcuda.so.1
nvcc -O3 -arch=sm_90 -cubin -DCOMPILE_TIME_CLUSTER kernels.cu -o build/kernels_ct.cubin
nvcc -O3 -arch=sm_90 -cubin kernels.cu -o build/kernels_rt.cubin
nvcc -O3 -std=c++17 --extra-device-vectorization -gencode=arch=compute_90a,code=sm_90a -cubin -I../../../cuda_src \
  -DMHC_NAME=proj_cluster_rt -DMHC_DTYPE=bf16 -DMHC_NMAX=4 -DMHC_PC_RUNTIME_CLUSTER ../../../cuda_src/mhc_dynamic_proj_cluster.cu \
  -o build/proj_cluster_rt.cubin
echo "built: $(ls build)"
