#!/usr/bin/env bash
# Session 37 on the device (after `bash .devwheels1/stage1.sh`; then this, with .devwheels2 carried):
# mhc_dynamic_coeffs_pre with MHC_CP_XH (the x_in warps form h_pre from the tile's partials once it is
# projected, instead of waiting for the coefficient warps to publish it; docs/HISTORY.md, session 37).
#   STAGE=1: build; the coeffs_pre GPU tests (the built source: XH on); ncu of the forward's kernels,
#            three-kernel path and one-read (times, DRAM bytes); the trace of XH (4 and 8 x_in warps)
#   STAGE=2: same-run A/B of the DynamicMHC forward, identity F, bfloat16 phi (sorted medians, us):
#        three     the shipped path (phi_split, proj_tc, coeffs, pre, post_res)
#        one-read  coeffs_pre as built (XH, 4 x_in warps, 3 coefficient warps)
#        ctl       coeffs_pre without XH (main's one-read kernel)
#        xh8c2 / xh8c1  XH with 8 x_in warps (2 items a lane) and 2 / 1 coefficient warps
#   export OUT; source .devwheels2/stage2.sh >/dev/null 2>&1; STAGE=1 bash scripts/gpu_xh_ab.sh
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/xh_ab.txt") 2>&1
export MHC_AOT_CUDA_ARCHS=${MHC_AOT_CUDA_ARCHS:-sm_90} MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} MHC_VALIDATE=0
bash scripts/gpu_check.sh build || exit 1
T1=":MHC_PHI_TERMS=1"
if [ "${STAGE:-1}" = 1 ]; then
  echo "=== pytest -m gpu -k coeffs_pre tests/test_dynamic.py ($(date +%T))"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dynamic.py -k coeffs_pre 2>&1 \
    | grep -E "^(FAILED|ERROR)|passed|failed|Error" | head -20
  if command -v ncu >/dev/null; then
    for path in three ""; do
      echo "=== ncu, ${path:-one-read}, (8192, 4, 4096) ($(date +%T))"
      timeout 100 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        --csv python3 scripts/ncu_dynamic_probe.py 8192 4 4096 $path 2>&1 | grep -E '^"[0-9]' \
        | awk -F'","' '{print $5, $(NF-2), $NF}' | tail -24
    done
  fi
  echo "=== trace, XH, 4 x_in warps ($(date +%T))"
  timeout 60 python3 scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 MHC_CP_XH=1 2>&1 | tail -16
  echo "=== trace, XH, 8 x_in warps, 2 coefficient warps ($(date +%T))"
  timeout 60 python3 scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 MHC_CP_XH=1 MHC_CP_XWARPS=8 MHC_CP_XU=2 \
    MHC_CP_CWARPS=2 @CP_BLOCK=608 2>&1 | tail -16
else
  configs=${MHC_AB_CONFIGS:-8192:4:4096,4096:4:2048,16384:4:2048,8192:2:4096}
  echo "=== A/B forward, phi bfloat16 ($(date +%T))"
  timeout 420 python3 scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 --configs "$configs" \
    "ctl=:MHC_CP_XH=0$T1" "xh8c2=:MHC_CP_XH=1:MHC_CP_XWARPS=8:MHC_CP_XU=2:MHC_CP_CWARPS=2$T1@CP_BLOCK=608" \
    "xh8c1=:MHC_CP_XH=1:MHC_CP_XWARPS=8:MHC_CP_XU=2:MHC_CP_CWARPS=1$T1@CP_BLOCK=576" \
    | grep -E "^AB|BUILD|rror"
fi
echo "=== done ($(date +%T))"
