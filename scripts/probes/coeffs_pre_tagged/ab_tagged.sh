#!/usr/bin/env bash
# Session 43's untimed variant of mhc_dynamic_coeffs_pre (the device budget ran out before its call): h_pre
# handed to the x_in warps as tagged 64-bit words that the first x_in warp alone polls, then shares in
# shared memory under an mbarrier (no fence, no `published` counter). docs/HISTORY.md, session 43, says why
# and what an earlier version (all four x_in warps polling) measured. To time it, from a clean main (the
# patch is against the kernel before session 45's register order, 6b630c2's):
#   git checkout 6b630c2 -- cuda_src/mhc_dynamic_coeffs_pre.cu
#   git apply scripts/probes/coeffs_pre_tagged/tagged_poller.patch   # MHC_CP_TAGGED on by default, its
#                 # shared memory (CP_SMEM_BYTES 223952), the counters' buffer with the tagged words, tests
#   then on the device, after `bash .devwheels1/stage1.sh` (carry .devwheels1), carrying .devwheels2:
#   bash scripts/probes/coeffs_pre_tagged/ab_tagged.sh
# (build with the variant shipped; A/B against the untagged kernel compiled here, `untag`; trace; the GPU
# tests). Emulated, with the patch: the coeffs_pre tests two-groups, n3-half-box, n1-ragged-split and the
# shuffled s1 / s3 pass (11 passed). Keep it only if it is faster in the same run, then drop the patch.
export OUT; source .devwheels2/stage2.sh >/dev/null 2>&1
export MHC_AOT_CUDA_ARCHS=sm_90 MHC_AOT_BUILD_JOBS=16 MHC_VALIDATE=0
bash scripts/gpu_check.sh build > $OUT/build.txt 2>&1 || { tail -20 $OUT/build.txt; exit 1; }
echo "=== A/B"; timeout 120 python3 scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 --rounds 5 --configs 8192:4:4096,16384:4:4096,1024:4:4096 \
  untag=:MHC_PHI_TERMS=1:MHC_CP_TAGGED=0@CP_SMEM_BYTES=223424 2>&1 | grep -v "^check [^8]"
echo "=== trace"; timeout 40 python3 scripts/trace_coeffs_pre.py 8192 4 4096 MHC_PHI_TERMS=1 2>&1 | grep -E "^iteration|^launch|^[348] |^landing|^x_in warp per"
echo "=== tests"; timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_dynamic.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | head
