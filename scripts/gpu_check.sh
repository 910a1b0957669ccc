#!/usr/bin/env bash
# The one device call: build the package with nvcc, run the GPU tests, time the kernels.
# From the device tool, right after `bash .devwheels1/stage1.sh` (see ../shared/device/README.md):
#   source .devwheels2/stage2.sh && bash scripts/gpu_check.sh
# Writes gpu_tests.log, timings.json and info.txt under $OUT (or ./gpu-out without it).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
mhc info > "$out/info.txt" 2>&1; cat "$out/info.txt"
# MHC_GPU_TESTS narrows the run (default: every test file); each test may take 120 s at most (pytest-timeout, present on the GPU image)
timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=120 ${MHC_GPU_TESTS:-tests} 2>&1 | tee "$out/gpu_tests.log" | tail -25
status=${PIPESTATUS[0]}
timeout 240 python3 scripts/gpu_timings.py "$out/timings.json"
exit "$status"
