"""A target for Nsight Compute: a few calls of the static layer at one shape, under the rules without
`ring` and then as they are (with `backward`: then with the backward's ring candidate of
scripts/gpu_strategy_ab.py too).

  ncu -k regex:mhc_ python3 scripts/ncu_probe.py [B n C] [backward]
"""
import sys

import mlx.core as mx

from mhc_aot import bench, dispatch

args = [a for a in sys.argv[1:] if a != "backward"]
B, n, C = (int(v) for v in (args[:3] or (1024, 32, 2048)))
backward = "backward" in sys.argv[1:]
sets = [tuple(r for r in dispatch.RULES if r.strategy != "ring"), dispatch.RULES]
if backward:
    sys.path.insert(0, "scripts")
    from gpu_strategy_ab import BACKWARD_RING

    sets.append((BACKWARD_RING, *dispatch.RULES))
for rules in sets:
    dispatch.RULES = rules
    case = bench.Case("throughput", B, n, C, "bfloat16", backward)
    runner = bench.make_runner("kernels", case, bench.make_inputs(case))
    for _ in range(3):
        runner.evaluate(runner.call())
    mx.synchronize()
    print(runner.note, flush=True)
