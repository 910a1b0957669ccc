#!/usr/bin/env bash
# The one device script: build with nvcc, run the GPU tests, time the kernels with `mhc bench`
# against the compiled portable path and the peers, profile with `mhc profile`.
# From the device tool, right after `bash .devwheels1/stage1.sh` (see ../shared/device/README.md):
#   source .devwheels2/stage2.sh && bash scripts/gpu_check.sh [STAGE...]
# The device has no internet: besides ../shared/device/prepare.sh's wheels, .devwheels2/ must hold
# what typer 0.29 imports at run time and the Liger peer (stage2.sh installs every wheel there):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     pydantic annotated-doc -d .devwheels2
#   pip download --no-deps liger-kernel==0.8.5 -d .devwheels2   # torch and triton are there
#   pip download --no-deps pytest-xdist==3.8.0 execnet==2.1.2 -d .devwheels2   # for the `alltests` stage
# Stages (default all, in this order): build tests sweep bench dynamic profile; `alltests`, `ab` and `dynamic_ab` on request
# (`alltests`: the README's test command, every test file and not only `-m gpu`, in 14 pytest-xdist workers:
# 437-490 s on the H200's 16 cores in session 26, 243 s in session 27; with `build` it fills a device call: `build alltests`;
# on the H100 every file no longer fits its 500 s (session 59), so split the files over two calls with MHC_GPU_TESTS
# (session 60: the static layer's four files, test_shim test_mhc_forward test_gradients test_layer, in 145 s);
# with MLX_USE_CUDA_GRAPHS=0 in the environment the whole suite runs where `cluster` is dispatched: 269 s, session 27;
# `ab`: scripts/gpu_strategy_ab.py, strategies with and without their rules, same run; then
# scripts/gpu_source_ab.py: the ring forward as shipped against its unit widths compiled on the device).
# `tests` (every file) took ~200 s on the H100 and `bench` with torch.compile ~6 minutes, so a
# 10-minute device call runs `build tests`, the next `build sweep bench dynamic profile` (build
# is a no-op when this machine's last build was of the same kernel sources). `dynamic` with Liger took ~190 s per pass
# (its child process compiles and autotunes Triton kernels for each shape first).
# Everything printed goes to $OUT/log.txt (or ./gpu-out without $OUT); `mhc profile` writes $OUT/profile-static/ and $OUT/profile-dynamic/.
# Knobs for a call with less device time: MHC_GPU_TESTS narrows the test run (default: every
# test file; `tests` and `alltests`) and MHC_TESTS_TIMEOUT bounds it (default 480 s, `alltests` 500 s); MHC_BENCH_COMPARE (default portable,seed,torch) and MHC_DYNAMIC_COMPARE (default
# portable,liger) pick the peers; MHC_PASSES (default "forward backward") the passes timed;
# MHC_PROFILE_SPECS (LAYER:B words, default "static:4096 dynamic:8192") the profiled runs;
# MHC_VALIDATE=0 skips `mhc validate --quick` in the build stage; MHC_NO_GRAPHS_TESTS=0 skips the
# tests stage's second run with MLX_USE_CUDA_GRAPHS=0; MHC_BENCH_SUITES (default "latency throughput
# large") the bench suites.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export MHC_AOT_BUILD_JOBS=${MHC_AOT_BUILD_JOBS:-16} PYTHONUNBUFFERED=1
# The device is an H100 (sm_90): build its cubins only, which keeps the build well under a minute.
export MHC_AOT_CUDA_ARCHS=${MHC_AOT_CUDA_ARCHS:-sm_90}
stages=${*:-build tests sweep bench dynamic profile}
passes=${MHC_PASSES:-forward backward}
flag() { [ "$1" = backward ] && echo --backward; }  # mhc bench times the forward without it
status=0
stage() { echo; echo "=== $1 ($(date +%T))"; }

for s in $stages; do
  case $s in
  build)
    stage build
    # the device's copy may show an old `git log`: name the sources by their content instead
    # (LC_ALL=C: the glob's order follows the locale's collation, which differs between machines)
    echo "sources: $(LC_ALL=C bash -c 'cat cuda_src/* mhc_aot/*.py' | sha1sum | cut -c1-12) (LC_ALL=C; cat cuda_src/* mhc_aot/*.py | sha1sum)"
    # (re)build unless this machine's last build was of these kernel sources: a warm machine keeps the
    # ignored mhc_aot/kernels/ of an earlier call, whose cubins may come from other sources (session 18
    # ran a whole test stage on such a leftover build)
    built=mhc_aot/kernels/.gpu_check_sources
    kernel_sources=$(LC_ALL=C bash -c 'cat cuda_src/* build_tools/*.py setup.py' | sha1sum | cut -c1-12)
    if ! command -v mhc >/dev/null || [ "$(cat "$built" 2>/dev/null)" != "$kernel_sources" ]; then
      python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
      echo "$kernel_sources" > "$built"
    fi
    python3 -c "import pydantic" 2>/dev/null || echo "pydantic missing: typer's CLI will fail; see this script's header"
    mhc info || status=1
    # every kernel family on this GPU vs the reference (~105 s on the H100; MHC_VALIDATE=0 skips it)
    [ "${MHC_VALIDATE:-1}" = 0 ] || timeout 180 mhc validate --quick || status=1 ;;
  tests)
    stage tests
    # pytest-timeout cannot interrupt a hung CUDA call: the outer timeout bounds the stage
    timeout "${MHC_TESTS_TIMEOUT:-480}" python3 -m pytest -q -rfE -m gpu -p no:cacheprovider --timeout=300 ${MHC_GPU_TESTS:-tests} \
      > "$out/gpu_tests.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)|AssertionError|^[0-9]+ (passed|failed)" "$out/gpu_tests.log" | head -60
    # the native shim's tests in full (few are gpu-marked): the shim crashed next to MLX's CUDA build
    # in a test that `-m gpu` never ran (session 25)
    timeout 120 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_shim.py > "$out/shim_tests.log" 2>&1 || status=1
    echo "shim tests, every one:"
    grep -E "^(FAILED|ERROR)|AssertionError|^[0-9]+ (passed|failed)|Fatal Python error" "$out/shim_tests.log" | head -20
    # the forward's `cluster` strategy runs only with MLX's CUDA graphs off (mhc_aot/dispatch.py,
    # CLUSTER_FORWARD): the forward, gradient and layer tests again in that mode
    [ "${MHC_NO_GRAPHS_TESTS:-1}" = 0 ] && continue
    MLX_USE_CUDA_GRAPHS=0 timeout "${MHC_TESTS_TIMEOUT:-480}" python3 -m pytest -q -rfE -m gpu -p no:cacheprovider \
      --timeout=300 tests/test_mhc_forward.py tests/test_gradients.py tests/test_layer.py > "$out/gpu_tests_no_graphs.log" 2>&1 \
      || status=1
    echo "MLX_USE_CUDA_GRAPHS=0:"
    grep -E "^(FAILED|ERROR)|AssertionError|^[0-9]+ (passed|failed)" "$out/gpu_tests_no_graphs.log" | head -30 ;;
  alltests)
    stage alltests
    # non-gpu tests run here too, on a CUDA default device (the portable path, the emulations):
    # session 26 ran them on the GPU machine for the first time (103 failed before conftest.py pinned
    # MLX_ENABLE_TF32=0). Without pytest-xdist, one process (~15 minutes: too long for one call)
    python3 -c "import xdist" 2>/dev/null && workers="-n 14 --dist worksteal -p no:benchmark" || workers=""
    # -v: each result is logged as it lands, so a run cut by the timeout (session 26: 490 s was not
    # quite enough once) still names its failures; the summary only comes at the end
    timeout "${MHC_TESTS_TIMEOUT:-500}" python3 -m pytest -v -rfE --tb=short $workers -p no:cacheprovider --timeout=300 \
      ${MHC_GPU_TESTS:-tests} > "$out/all_tests.log" 2>&1 || status=1
    grep -oE "(FAILED|ERROR) tests/[^ ]+" "$out/all_tests.log" | sort -u | head -60
    echo "$(grep -cE "PASSED tests/" "$out/all_tests.log") passed, $(grep -cE "SKIPPED tests/" "$out/all_tests.log") skipped"
    grep -E "^=+ .*(passed|failed).* in " "$out/all_tests.log" || echo "(no summary: the run was cut at ${MHC_TESTS_TIMEOUT:-500} s)" ;;
  sweep)
    stage sweep
    timeout 240 python3 scripts/gpu_dispatch_sweep.py || status=1 ;;
  bench)
    stage bench
    # issue 3's tables: the seed's latency and throughput shapes and the large suite, forward and
    # forward + backward, against the compiled portable path, mhc-mlx and torch.compile
    for suite in ${MHC_BENCH_SUITES:-latency throughput large}; do
      for pass in $passes; do
        timeout 240 mhc bench --suite "$suite" $(flag "$pass") --compare "${MHC_BENCH_COMPARE:-portable,seed,torch}" \
          || status=1
      done
    done ;;
  dynamic)
    stage dynamic
    # issue 6's configs against LigerMHC (liger-kernel 0.8.5, Triton) in the same run
    # (Triton compiles LigerMHC's kernels on their first call: the first pass takes longest)
    for pass in $passes; do
      timeout 300 mhc bench --layer dynamic --mode throughput --config 8192:4:4096,4096:4:2048,32:4:4096 \
        $(flag "$pass") --compare "${MHC_DYNAMIC_COMPARE:-portable,liger}" || status=1
    done ;;
  dynamic_ab)
    stage dynamic_ab
    # the evidence of the one-read forward's rule (mhc_aot/cuda_dynamic.py, CP_SHAPES): same-run A/Bs of
    # mhc_dynamic_coeffs_pre against the three-kernel path, in and just outside the rule, both phi dtypes,
    # then forward + backward (~40 s for six forward configs on the H100, session 38)
    timeout 200 python3 scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 \
      --configs 8192:4:4096,16384:4:4096,1024:4:4096,8192:4:2048,8192:2:4096,8192:4:8192 || status=1
    timeout 150 python3 scripts/gpu_dynamic_ab.py --phi-dtype float32 --configs 8192:4:4096,16384:4:4096,1024:4:4096 \
      || status=1
    timeout 200 python3 scripts/gpu_dynamic_ab.py --backward --phi-dtype bfloat16 --configs 8192:4:4096,1024:4:4096 \
      || status=1 ;;
  ab)
    stage ab
    # same-run A/B (scripts/gpu_strategy_ab.py): the rules with and without the forward's `ring`,
    # then forward + backward with and without the backward's
    timeout 300 python3 scripts/gpu_strategy_ab.py ring || status=1
    timeout 300 python3 scripts/gpu_strategy_ab.py backward_ring || status=1
    # the ring forward as shipped (its widest units for each C) against its unit widths compiled here
    timeout 300 python3 scripts/gpu_source_ab.py mhc_forward_ring shipped= units1=:MHC_RING_UNITS=1 \
      units2=:MHC_RING_UNITS=2 || status=1 ;;
  profile)
    stage profile
    # the static layer's large shape, then issue 6's dynamic shape; each report's per-kernel
    # summary is printed as text (durations, DRAM throughput), readable without ncu here
    for spec in ${MHC_PROFILE_SPECS:-static:4096 dynamic:8192}; do
      set -- ${spec/:/ }
      timeout 200 mhc profile --layer "$1" --B "$2" --n 4 --C 4096 --out "$out/profile-$1" || status=1
      if command -v ncu >/dev/null && [ -f "$out/profile-$1/ncu_report.ncu-rep" ]; then
        ncu --import "$out/profile-$1/ncu_report.ncu-rep" --print-summary per-kernel 2>&1 \
          | grep -E "mhc_|Duration|DRAM Throughput|Memory Throughput|Registers|Achieved Occupancy" | head -120
      fi
    done ;;
  *) echo "unknown stage $s"; status=2 ;;
  esac
done
stage "done, status $status"
exit "$status"
