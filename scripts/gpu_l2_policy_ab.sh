#!/usr/bin/env bash
# L2 eviction priorities across the dynamic forward's two big launches, on the device in one call, after
# `bash .devwheels1/stage1.sh`; then, with .devwheels2 carried:
#   export OUT; source .devwheels2/stage2.sh >/dev/null 2>&1; bash scripts/gpu_l2_policy_ab.sh
# Why: the forward moves 938 MB at (8192, 4, 4096) and DRAM sets its floor; the one lever on bytes left is
# L2 (50 MB). post_res walks the tokens last to first (session 43), so its first reads are the x and x_in
# lines that the coefficients launch touched last; the knobs (all timing-only, off in the shipped build)
# keep those lines (coeffs_pre's MHC_CP_KEEP last tiles at evict_last, the earlier ones at MHC_CP_EARLY)
# and stop x_out's writes from pushing them out (post_res's MHC_PR_STORE_CS, and MHC_PR_LOAD_CS for its reads).
#   1. build
#   2. same-run A/Bs of the DynamicMHC forward, identity F, bfloat16 x and phi (sorted medians, us): the
#      three kernels and the one-read path as built; compiled here: the one-read path (`ctl`), and
#      MHC_CP_XL2 (`xl2`; `xl2r4`: 4 workers' buffers and 2 x_in buffers; `xl2st`: with x_out streamed):
#      the ring's buffers split between the workers (refilled once the products are read) and the x_in
#      warps (each tile copied again from L2, where its first copy was kept at evict_last); then x_out
#      streamed (`st`), x_out, x and f streamed (`stld`), coeffs_pre's last 8 tiles kept (`k8`, the earlier
#      ones evict_first), both (`k8st`, `k8stld`)
#   3. ncu (no cache flush between launches): each launch's DRAM bytes as built, with k8st's knobs, and
#      with MHC_CP_XL2 (whether x_in's second copy of x hits L2); a trace of MHC_CP_XL2
#   4. (XL2_TESTS=1, the default) the build with MHC_CP_XL2 on, and its GPU tests of the one-read kernel
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/l2_policy_ab.txt") 2>&1
export MHC_AOT_CUDA_ARCHS=${MHC_AOT_CUDA_ARCHS:-sm_90} MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} MHC_VALIDATE=0
bash scripts/gpu_check.sh build > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
configs=${AB_CONFIGS:-8192:4:4096,4096:4:2048}
pr=mhc_dynamic_post_res
echo "=== A/B forward, MHC_CP_XL2 ($(date +%T))"
timeout ${AB_TIMEOUT:-150} python3 scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 --rounds ${AB_ROUNDS:-4} --configs $configs \
  ctl=:MHC_PHI_TERMS=1 xl2=:MHC_PHI_TERMS=1:MHC_CP_XL2=1 xl2r4=:MHC_PHI_TERMS=1:MHC_CP_XL2=1:MHC_CP_XL2_RP=4 \
  xl2st=:MHC_PHI_TERMS=1:MHC_CP_XL2=1+$pr:MHC_PR_STORE_CS=1
echo "=== A/B forward, L2 priorities ($(date +%T))"
timeout ${AB_TIMEOUT:-150} python3 scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 --rounds ${AB_ROUNDS:-4} --configs $configs \
  ctl=:MHC_PHI_TERMS=1 st=:MHC_PHI_TERMS=1+$pr:MHC_PR_STORE_CS=1 stld=:MHC_PHI_TERMS=1+$pr:MHC_PR_STORE_CS=1:MHC_PR_LOAD_CS=1 \
  k8=:MHC_PHI_TERMS=1:MHC_CP_KEEP=8 k8st=:MHC_PHI_TERMS=1:MHC_CP_KEEP=8+$pr:MHC_PR_STORE_CS=1 \
  k8stld=:MHC_PHI_TERMS=1:MHC_CP_KEEP=8+$pr:MHC_PR_STORE_CS=1:MHC_PR_LOAD_CS=1
ncu_variants=("xl2=:MHC_CP_XL2=1" "" "k8=:MHC_CP_KEEP=8 also=$pr:MHC_PR_STORE_CS=1")
[ "${NCU_ALL:-1}" = 1 ] || ncu_variants=("xl2=:MHC_CP_XL2=1")
for v in "${ncu_variants[@]}"; do
  echo "=== ncu, DRAM bytes a launch, float32 phi: ${v:-as built} ($(date +%T))"
  timeout 90 ncu --cache-control none --clock-control none -k regex:"coeffs_pre|post_res" \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    python3 scripts/ncu_dynamic_probe.py 8192 4 4096 $v 2>&1 | grep -E "mhc_|duration|dram__" | tail -12
done
echo "=== trace, MHC_CP_XL2 ($(date +%T))"
[ "${TRACE:-1}" = 1 ] && timeout 60 python3 scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 MHC_CP_XL2=1 2>&1 | grep -v "^BUILD"
if [ "${XL2_TESTS:-1}" = 1 ]; then
  echo "=== GPU tests of coeffs_pre with MHC_CP_XL2 built in ($(date +%T))"
  sed -i 's/^#define MHC_CP_XL2 0$/#define MHC_CP_XL2 1/' cuda_src/mhc_dynamic_coeffs_pre.cu
  bash scripts/gpu_check.sh build > "$out/build_xl2.txt" 2>&1 || { tail -30 "$out/build_xl2.txt"; exit 1; }
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dynamic.py -k "coeffs_pre or dynamic_layer" 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | head
  sed -i 's/^#define MHC_CP_XL2 1$/#define MHC_CP_XL2 0/' cuda_src/mhc_dynamic_coeffs_pre.cu
fi
echo "=== done ($(date +%T))"
