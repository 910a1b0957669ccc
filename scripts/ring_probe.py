"""Probe for ncu: the forward at one shape under the default rules and with `ring` first."""
import sys
import mlx.core as mx
from mhc_aot import bench, dispatch
sys.path.insert(0, "scripts")
from gpu_strategy_ab import RING

B, n, C = (int(v) for v in (sys.argv[1:4] or (1024, 32, 2048)))
for rules in (dispatch.RULES, (RING, *dispatch.RULES)):
    dispatch.RULES = rules
    case = bench.Case("throughput", B, n, C, "bfloat16", False)
    runner = bench.make_runner("kernels", case, bench.make_inputs(case))
    for _ in range(3):
        runner.evaluate(runner.call())
    mx.synchronize()
    print(runner.note)
