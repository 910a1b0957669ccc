#!/usr/bin/env bash
# post_res's token order (session 43: last to first) and T = 32's host growth, on the device in one call, after
# `bash .devwheels1/stage1.sh`; then, with .devwheels2 carried:
#   export OUT; source .devwheels2/stage2.sh >/dev/null 2>&1; bash scripts/gpu_post_res_order_ab.sh
#   1. build
#   2. same-run A/B of the DynamicMHC forward, identity F, bfloat16 x and phi (sorted medians, us):
#      the three kernels as built (post_res last token first since session 43); the one-read kernel
#      with post_res compiled here (`ctl`, the tree's order) and with post_res walking its tokens first
#      to last (`fwd`, MHC_PR_REVERSE=0: the order before); the three kernels with that order (`fwd3`).
#      Why the order matters: a forward's coefficients (or pre) read x and write x_in token by token,
#      so their last tokens may still be in L2 when post_res starts, and post_res's last tokens are the
#      next forward's first
#   3. T = 32's forward after the large configs' kernel rows (scripts/dynamic_host_probe.py): after
#      (8192, 4, 4096), whose one-read path makes host-created arrays (tma.template), after
#      (4096, 4, 2048), which has none, and the control (no rows)
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/post_res_order.txt") 2>&1
export MHC_AOT_CUDA_ARCHS=${MHC_AOT_CUDA_ARCHS:-sm_90} MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} MHC_VALIDATE=0
bash scripts/gpu_check.sh build > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
echo "=== A/B forward, post_res's order ($(date +%T))"
timeout ${AB_TIMEOUT:-330} python3 scripts/gpu_dynamic_ab.py --source mhc_dynamic_post_res --phi-dtype bfloat16 \
  --rounds ${AB_ROUNDS:-4} --configs ${AB_CONFIGS:-8192:4:4096,16384:4:4096,4096:4:2048} \
  ctl=:@CP_MIN_T=1024 fwd=:MHC_PR_REVERSE=0@CP_MIN_T=1024 fwd3=:MHC_PR_REVERSE=0
for after in 8192:4:4096 4096:4:2048; do
  echo "=== T = 32 after $after, kernels rows ($(date +%T))"
  timeout 60 python3 scripts/dynamic_host_probe.py --after $after --impls kernels 2>&1
done
echo "=== T = 32, control ($(date +%T))"
timeout 60 python3 scripts/dynamic_host_probe.py --after 8192:4:4096 --impls none 2>&1
echo "=== done ($(date +%T))"
