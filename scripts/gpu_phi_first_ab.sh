#!/usr/bin/env bash
# MHC_CP_PHI_FIRST (mhc_dynamic_coeffs_pre: tile 0, phi's fragments, then the ring's other tiles) on the
# device in one call, after `bash .devwheels1/stage1.sh`; then, with .devwheels2 carried:
#   export OUT; source .devwheels2/stage2.sh >/dev/null 2>&1; bash scripts/gpu_phi_first_ab.sh
#   1. build (the shipped kernel: PHI_FIRST 0)
#   2. traces, both orders (entry -> phi loaded -> first tile; the launch's span)
#   3. same-run A/B of the DynamicMHC forward, identity F, bfloat16 phi (sorted medians, us): the three
#      kernels, the one-read kernel as shipped, `ctl` compiled here from the same source, `pf` with
#      PHI_FIRST 1; each path's outputs checked against the three kernels' first
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/phi_first.txt") 2>&1
export MHC_AOT_CUDA_ARCHS=${MHC_AOT_CUDA_ARCHS:-sm_90} MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} MHC_VALIDATE=0
bash scripts/gpu_check.sh build || exit 1
for pf in 0 1; do
  echo "=== trace, MHC_CP_PHI_FIRST=$pf ($(date +%T))"
  timeout 90 python3 scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 MHC_CP_PHI_FIRST=$pf 2>&1 | tail -30
done
echo "=== A/B forward, bfloat16 phi ($(date +%T))"
timeout 300 python3 scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 --configs 8192:4:4096,16384:4:4096,4096:4:2048,1024:4:4096 \
  ctl=:MHC_PHI_TERMS=1 pf=:MHC_PHI_TERMS=1:MHC_CP_PHI_FIRST=1
echo "=== done ($(date +%T))"
