"""A target for Nsight Compute: a few DynamicMHC forward calls (identity F, bfloat16) at one shape with
mhc_dynamic_coeffs_pre in the dispatch, as built or as a variant compiled here (e.g. with -lineinfo).

  ncu -k regex:coeffs_pre python3 scripts/ncu_dynamic_probe.py [T n C] [LABEL=[PATH][:DEFINE|-FLAG...]]
  ncu python3 scripts/ncu_dynamic_probe.py [T n C] three    # the three-kernel path (no one-read kernel)
  ncu --import-source yes ... three lineinfo=mhc_dynamic_proj_tc,mhc_dynamic_coeffs   # those kernels
      compiled here with -lineinfo (NMAX 4 and 0; their names end in _ab_li), for ncu's source page
  ncu ... also=mhc_dynamic_post_res:MHC_PR_REVERSE=0   # another kernel compiled here with those defines
"""
import sys
from pathlib import Path

import mlx.core as mx

from mhc_aot import bench, cuda, cuda_dynamic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_source_ab  # noqa: E402

SOURCE = "mhc_dynamic_coeffs_pre"
three = "three" in sys.argv[1:]
nums = [a for a in sys.argv[1:] if "=" not in a and a != "three"]
lineinfo = [src for a in sys.argv[1:] if a.startswith("lineinfo=") for src in a.partition("=")[2].split(",")]
also = [a.partition("=")[2] for a in sys.argv[1:] if a.startswith("also=")]
specs = [a for a in sys.argv[1:] if "=" in a and not a.startswith(("lineinfo=", "also="))]
T, n, C = (int(v) for v in (nums[:3] or (8192, 4, 4096)))
if specs:
    gpu_source_ab.use(SOURCE, gpu_source_ab.compile_variant(SOURCE, specs[0], (4,))[1], cuda._binary)
for src in lineinfo:  # each wraps the lookup before it
    gpu_source_ab.use(src, gpu_source_ab.compile_variant(src, "li=:-lineinfo", (4, 0))[1], cuda._binary)
for a in also:
    src, _, defines = a.partition(":")
    gpu_source_ab.use(src, gpu_source_ab.compile_variant(src, f"also=:{defines}", (4, 0))[1], cuda._binary)
cuda_dynamic.CP_MIN_T, cuda_dynamic.CP_SHAPES = (None if three else 1), False  # any shape
case = bench.Case("throughput", T, n, C, "bfloat16", False, layer="dynamic")
runner = bench.make_runner("kernels", case, bench.make_inputs(case))
for _ in range(3):
    runner.evaluate(runner.call())
mx.synchronize()
print(runner.note, flush=True)
