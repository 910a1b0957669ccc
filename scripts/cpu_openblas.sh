#!/usr/bin/env bash
# MLX's CPU matmuls on Linux, as shipped and with an optimised BLAS preloaded: a measurement, not a test.
#
# The `mlx-cpu` wheel (MLX 0.32.4, Linux x86_64) links netlib's reference BLAS (mlx_cpu.libs/libblas-*.so,
# plain Fortran loops): float32 matmuls run at a few GFLOP/s, and DynamicMHC's portable forward spends most
# of its time in its one matmul, the projection vec(x) @ phi. libmlx.so calls cblas_sgemm / cblas_dgemm
# through the dynamic linker, so an LD_PRELOADed library that exports them takes those calls. This script
# builds such a library in a scratch directory (two functions forwarding to scipy-openblas32, whose symbols
# carry a `scipy_` prefix; pip installs it there, nothing is installed into the environment), then times
# the same `mhc bench` rows without and with it. A system OpenBLAS or MKL that exports the plain CBLAS names
# can be preloaded directly instead.
#   bash scripts/cpu_openblas.sh [CONFIGS]        (default 256:4:1024,32:4:4096)
set -euo pipefail
configs=${1:-256:4:1024,32:4:4096}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 -m pip install -q --no-deps --target "$dir/py" scipy-openblas32
lib=$(PYTHONPATH="$dir/py" python3 -c "import scipy_openblas32 as s; print(s.get_lib_dir())")
cat > "$dir/forward.c" <<'EOF'
/* MLX's CBLAS gemm calls, forwarded to scipy-openblas32 (32-bit integers, `scipy_`-prefixed names) */
typedef int I;
void scipy_cblas_sgemm(I, I, I, I, I, I, float, const float*, I, const float*, I, float, float*, I);
void scipy_cblas_dgemm(I, I, I, I, I, I, double, const double*, I, const double*, I, double, double*, I);
void cblas_sgemm(I o, I ta, I tb, I m, I n, I k, float al, const float* a, I lda, const float* b, I ldb,
                 float be, float* c, I ldc) {
  scipy_cblas_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
void cblas_dgemm(I o, I ta, I tb, I m, I n, I k, double al, const double* a, I lda, const double* b, I ldb,
                 double be, double* c, I ldc) {
  scipy_cblas_dgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);
}
EOF
gcc -O2 -shared -fPIC "$dir/forward.c" -o "$dir/libmlx_openblas.so" -L"$lib" -lscipy_openblas -Wl,-rpath,"$lib"
matmul='from mhc_aot import bench
T, K, M = bench.MATMUL_SHAPE
print(f"float32 [{T}, {K}] @ [{K}, {M}]: {bench.measure_matmul_gflops():.1f} GFLOP/s")'
for pre in "" "$dir/libmlx_openblas.so"; do
  if [ -n "$pre" ]; then echo "=== LD_PRELOAD=libmlx_openblas.so (scipy-openblas32)"; else echo "=== as shipped"; fi
  LD_PRELOAD=$pre python3 -c "$matmul"
  LD_PRELOAD=$pre mhc bench --layer dynamic --mode throughput --config "$configs" --compare portable -q
done
