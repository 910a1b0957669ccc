"""A target for Nsight Compute: a few calls of the static layer at one shape, under the rules without
`ring` and then as they are.

  ncu -k regex:mhc_ python3 scripts/ncu_probe.py [B n C] [backward]
"""
import sys

import mlx.core as mx

from mhc_aot import bench, dispatch

args = [a for a in sys.argv[1:] if a != "backward"]
B, n, C = (int(v) for v in (args[:3] or (1024, 32, 2048)))
backward = "backward" in sys.argv[1:]
for rules in (tuple(r for r in dispatch.RULES if r.strategy != "ring"), dispatch.RULES):
    dispatch.RULES = rules
    case = bench.Case("throughput", B, n, C, "bfloat16", backward)
    runner = bench.make_runner("kernels", case, bench.make_inputs(case))
    for _ in range(3):
        runner.evaluate(runner.call())
    mx.synchronize()
    print(runner.note, flush=True)
