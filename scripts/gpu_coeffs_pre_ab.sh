#!/usr/bin/env bash
# mhc_dynamic_coeffs_pre as in the tree against an earlier source of it, on the device in one call, after
# `bash .devwheels1/stage1.sh`; then, with .devwheels2 carried (OLD.cu untracked in the repo, e.g.
# `git show REV:cuda_src/mhc_dynamic_coeffs_pre.cu > ab_old_coeffs_pre.cu`):
#   export OUT; source .devwheels2/stage2.sh >/dev/null 2>&1; bash scripts/gpu_coeffs_pre_ab.sh [OLD.cu]
#   1. build; the dynamic layer's GPU tests (SKIP_TESTS=1: not run, for a repeat on a warm machine)
#   2. traces of the tree's kernel and, given OLD.cu, the old (entry -> phi loaded, the tile's pace, the
#      x_in warps' work a tile)
#   3. same-run A/B of the DynamicMHC forward, identity F (sorted medians, us): the three kernels, the
#      one-read kernel as built, and `old` (OLD.cu, compiled here); bfloat16 phi at
#      four configs, then float32 phi (three terms) at T = 8192; each path's outputs checked against the
#      three kernels'
# Session 42 timed phi's loads with it (then scripts/gpu_phi_loads_ab.sh), session 43 the x_in loop.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/coeffs_pre_ab.txt") 2>&1
old=${1:-}
export MHC_AOT_CUDA_ARCHS=${MHC_AOT_CUDA_ARCHS:-sm_90} MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} MHC_VALIDATE=0
bash scripts/gpu_check.sh build > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
echo "=== pytest -m gpu tests/test_dynamic.py ($(date +%T))"
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dynamic.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | head -20
for src in "" ${old:+"$old"}; do
  echo "=== trace ${src:-of the tree} ($(date +%T))"
  timeout 90 python3 scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 $src 2>&1 | grep -v "^BUILD"
  echo "--- the x_in warps' tile (MHC_CP_TRACE_X)"
  timeout 90 python3 scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 MHC_CP_TRACE_X $src 2>&1 | grep -E "^[79] |x_in warp"
done
echo "=== A/B forward, bfloat16 phi ($(date +%T))"
timeout 200 python3 scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 --rounds ${AB_ROUNDS:-3} --configs 8192:4:4096,16384:4:4096,4096:4:2048,1024:4:4096 \
  ${old:+old=$old:MHC_PHI_TERMS=1}
echo "=== A/B forward, float32 phi ($(date +%T))"
timeout 100 python3 scripts/gpu_dynamic_ab.py --configs 8192:4:4096 ${old:+old=$old}
echo "=== done ($(date +%T))"
