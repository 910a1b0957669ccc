"""A target for Nsight Compute: a few calls of the static layer at one shape, under the default rules
and then with `ring` (scripts/gpu_strategy_ab.py's candidate rule) first.

  ncu -k regex:mhc_ python3 scripts/ring_probe.py [B n C] [backward]
"""
import sys

import mlx.core as mx

from mhc_aot import bench, dispatch

sys.path.insert(0, "scripts")
from gpu_strategy_ab import RING  # noqa: E402

args = [a for a in sys.argv[1:] if a != "backward"]
B, n, C = (int(v) for v in (args[:3] or (1024, 32, 2048)))
backward = "backward" in sys.argv[1:]
for rules in (dispatch.RULES, (RING, *dispatch.RULES)):
    dispatch.RULES = rules
    case = bench.Case("throughput", B, n, C, "bfloat16", backward)
    runner = bench.make_runner("kernels", case, bench.make_inputs(case))
    for _ in range(3):
        runner.evaluate(runner.call())
    mx.synchronize()
    print(runner.note, flush=True)
