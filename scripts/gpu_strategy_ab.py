"""Same-run A/B of forward strategies on the GPU: for each shape, the forward under each rule set,
alternating the order over rounds, in both of `mhc bench`'s modes (queued throughput and evaluated
latency). Run-to-run spread on the device is larger than most differences worth measuring, so
strategies are compared inside one process.

  python scripts/gpu_strategy_ab.py                      # default rules vs the rules without `ring`
  MLX_USE_CUDA_GRAPHS=0 python scripts/gpu_strategy_ab.py cluster   # with vs without `cluster`
  python scripts/gpu_strategy_ab.py backward_ring        # forward + backward, with vs without the candidate

Prints one line per (shape, rule set, mode): the sorted medians of the rounds and what ran.
"""

from __future__ import annotations

import sys

from mhc_aot import bench, dispatch

SHAPES = [(1024, 32, 2048), (4096, 16, 1024), (256, 32, 2048), (32, 32, 2048), (1, 32, 2048), (1024, 16, 4096),
          (4096, 32, 1024), (1024, 32, 3072), (64, 32, 2048), (1024, 16, 2048), (256, 16, 4096), (4096, 16, 2048)]
# The backward's ring over the kernel's whole range (a token's dout in one CTA's shared memory:
# n = 32 up to C = 2560, n = 16 up to 4864 on a 227 KB GPU), wider than its measured rule
BACKWARD_RING = dispatch.Rule("cuda", "mhc_backward", "ring", None, None, "A/B candidate", n_in=(16, 32),
                              dtypes=("bf16",), C_multiple=256, smem_need="backward_ring")


def rule_sets(which: str) -> tuple[tuple[str, tuple], ...]:
    """The rules with and without the strategy `which`: the forward's cluster or ring, or
    backward_ring (the backward's ring over its kernel's whole range)."""
    rules = dispatch.RULES
    if which == "backward_ring":
        base = tuple(r for r in rules if not (r.op == "mhc_backward" and r.strategy == "ring"))
        return (which, (BACKWARD_RING, *base)), ("without", base)
    return (which, rules), ("without", tuple(r for r in rules if not (r.op == "mhc_forward" and r.strategy == which)))


def main(which: str = "ring", rounds: int = 3) -> None:
    original, sets = dispatch.RULES, rule_sets(which)
    for B, n, C in SHAPES:
        res = {tag: [] for tag, _ in sets}
        for rnd in range(rounds):
            for tag, rules in (sets if rnd % 2 == 0 else sets[::-1]):
                dispatch.RULES = rules
                for mode in ("throughput", "latency"):
                    case = bench.Case(mode, B, n, C, "bfloat16", which == "backward_ring")
                    runner = bench.make_runner("kernels", case, bench.make_inputs(case))
                    t = bench.time_runner(runner, mode, 30 if mode == "throughput" else 40, 5, repeats=5)
                    res[tag].append((mode, t.median_us, runner.note))
        for tag, rows in res.items():
            for mode in ("throughput", "latency"):
                medians = sorted(m for md, m, _ in rows if md == mode)
                note = next(nt for md, _, nt in rows if md == mode)
                print(f"AB graphs={int(dispatch.cuda_graphs())} {B},{n},{C} {tag:8s} {mode:10s} "
                      f"{' '.join(f'{m:7.1f}' for m in medians)}  {note}", flush=True)
    dispatch.RULES = original


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["ring"]))
