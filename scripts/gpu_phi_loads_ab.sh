#!/usr/bin/env bash
# mhc_dynamic_coeffs_pre's phi loads (all of a lane's in flight at once, session 42) on the device in one
# call, after `bash .devwheels1/stage1.sh`; then, with .devwheels2 carried (session 42's OLD.cu:
# `git show 875683a:cuda_src/mhc_dynamic_coeffs_pre.cu > ab_old_coeffs_pre.cu`, untracked):
#   export OUT; source .devwheels2/stage2.sh >/dev/null 2>&1; bash scripts/gpu_phi_loads_ab.sh [OLD.cu]
#   1. build; the dynamic layer's GPU tests (SKIP_TESTS=1: not run, for a repeat on a warm machine)
#   2. traces of the new kernel and, given OLD.cu (the kernel before), the old (entry -> phi loaded)
#   3. same-run A/B of the DynamicMHC forward, identity F (sorted medians, us): the three kernels, the
#      one-read kernel as built, and `old` (OLD.cu, compiled here); bfloat16 phi at
#      four configs, then float32 phi (three terms) at T = 8192; each path's outputs checked against the
#      three kernels'
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/phi_loads.txt") 2>&1
old=${1:-}
export MHC_AOT_CUDA_ARCHS=${MHC_AOT_CUDA_ARCHS:-sm_90} MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} MHC_VALIDATE=0
bash scripts/gpu_check.sh build > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
echo "=== pytest -m gpu tests/test_dynamic.py ($(date +%T))"
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dynamic.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | head -20
for src in "" ${old:+"$old"}; do
  echo "=== trace ${src:-of the tree} ($(date +%T))"
  timeout 90 python3 scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 $src 2>&1 | sed -n 2,6p
done
echo "=== A/B forward, bfloat16 phi ($(date +%T))"
timeout 200 python3 scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 --configs 8192:4:4096,16384:4:4096,4096:4:2048,1024:4:4096 \
  ${old:+old=$old:MHC_PHI_TERMS=1}
echo "=== A/B forward, float32 phi ($(date +%T))"
timeout 100 python3 scripts/gpu_dynamic_ab.py --configs 8192:4:4096 ${old:+old=$old}
echo "=== done ($(date +%T))"
