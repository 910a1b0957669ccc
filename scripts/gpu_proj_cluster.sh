#!/usr/bin/env bash
# mhc_dynamic_proj_cluster on the device in one call (after `bash .devwheels1/stage1.sh`; then, with
# .devwheels2 carried: export OUT; source .devwheels2/stage2.sh >/dev/null 2>&1; bash scripts/gpu_proj_cluster.sh):
#   1. build; its GPU tests with MLX_USE_CUDA_GRAPHS=0 (the only setting where it runs), and the dynamic
#      layer's other GPU tests in that setting
#   2. ncu of the forward's kernels at (8192, 4, 4096), bfloat16 phi, graphs off (times, DRAM bytes)
#   3. same-run A/Bs of the DynamicMHC forward around an identity F, bfloat16 phi (sorted medians, us):
#        graphs off: `three` the three-kernel path (PROJ_CLUSTER is off by default since session 37),
#        cl16 / cl15 / cl14 proj_cluster with 16 (as many as the SMs hold at one CTA an SM) / 15 / 14 clusters
#        graphs on (MLX's default, another process): the shipped three-kernel path
#   STAGE=2: 1, then an A/B of variants each leaving a stage out (timing-only defines MHC_PC_SKIP_*)
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/proj_cluster.txt") 2>&1
export MHC_AOT_CUDA_ARCHS=${MHC_AOT_CUDA_ARCHS:-sm_90} MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} MHC_VALIDATE=0
bash scripts/gpu_check.sh build || exit 1
echo "=== MLX_USE_CUDA_GRAPHS=0 pytest -m gpu -k 'proj_cluster or coeffs_pre or dynamic_layer' tests/test_dynamic.py ($(date +%T))"
MLX_USE_CUDA_GRAPHS=0 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dynamic.py \
  -k "proj_cluster" 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed|Error" | head -20
if [ "${STAGE:-1}" = 1 ] && command -v ncu >/dev/null; then
  echo "=== ncu, graphs off, (8192, 4, 4096), bfloat16 phi ($(date +%T))"
  MLX_USE_CUDA_GRAPHS=0 timeout 100 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    --csv python3 scripts/ncu_dynamic_probe.py 8192 4 4096 three 2>&1 | grep -E '^"[0-9]' \
    | awk -F'","' '{print $5, $(NF-2), $NF}' | tail -12
fi
if [ "${STAGE:-1}" = 2 ]; then  # where its time goes: timing-only defines, each leaving a stage out (wrong outputs)
  echo "=== A/B forward, graphs off, phi bfloat16, stages left out ($(date +%T))"
  c15=@PROJ_CLUSTER=1,PC_CLUSTERS=15
  MLX_USE_CUDA_GRAPHS=0 timeout 300 python3 scripts/gpu_dynamic_ab.py --source mhc_dynamic_proj_cluster \
    --phi-dtype bfloat16 --configs "${MHC_AB_CONFIGS:-8192:4:4096,16384:4:4096}" "ctl=:$c15" \
    "noxin=:MHC_PC_SKIP_XIN$c15" "nosums=:MHC_PC_SKIP_SUMS$c15" "nobar=:MHC_PC_SKIP_BARRIER:MHC_PC_SKIP_SUMS$c15" \
    "noprod=:MHC_PC_SKIP_PRODUCT$c15" \
    "stream=:MHC_PC_SKIP_XIN:MHC_PC_SKIP_SUMS:MHC_PC_SKIP_BARRIER:MHC_PC_SKIP_PRODUCT$c15" | grep -E "^AB|BUILD|rror"
  echo "=== done ($(date +%T))"
  exit 0
fi
configs=${MHC_AB_CONFIGS:-8192:4:4096,4096:4:4096,16384:4:4096,1024:4:4096}
echo "=== A/B forward, graphs off, phi bfloat16 ($(date +%T))"
MLX_USE_CUDA_GRAPHS=0 timeout 240 python3 scripts/gpu_dynamic_ab.py --source mhc_dynamic_proj_tc --phi-dtype bfloat16 \
  --configs "$configs" cl16=@PROJ_CLUSTER=1 cl15=@PROJ_CLUSTER=1,PC_CLUSTERS=15 cl14=@PROJ_CLUSTER=1,PC_CLUSTERS=14 | grep -E "^AB|rror"
echo "=== A/B forward, graphs on, phi bfloat16 ($(date +%T))"
timeout 100 python3 scripts/gpu_dynamic_ab.py --source mhc_dynamic_proj_tc --phi-dtype bfloat16 \
  --configs "$configs" | grep -E "^AB|rror"
echo "=== done ($(date +%T))"
