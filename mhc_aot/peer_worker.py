"""Times one implementation on one `mhc bench` case in a process of its own.

`mhc bench` (bench.run) sends the PyTorch peers here (torch, liger), one child process per peer
for all cases of the run (its JIT and autotuning caches stay warm across them), so that PyTorch never loads in the process that times MLX: on an H100, with PyTorch and
Triton imported and holding a CUDA context next to MLX, MLX's host-bound small shapes read ~40%
slower (DynamicMHC forward at T = 32: 80 us alone, 119 us with Liger loaded). Any implementation
runs here; the tests time "portable" to check this path on machines without PyTorch.

Protocol (bench.peer_spec, bench.time_in_child): a JSON spec on stdin - impl, the cases' fields,
iters / warmup / repeats per case, seed; on success one JSON line on stdout,
{"results": [{"samples_s": [...], "note": ...} per case]}.
A BenchError (the peer cannot run here, e.g. liger without CUDA) is its message on stderr with exit
code 2; anything else, its traceback. The parent raises either as a BenchError; it never falls back
to timing in its own process.
"""

from __future__ import annotations

import json
import sys


def read_spec(text: str):
    """(impl, [Case], [Settings], seed) from bench.peer_spec's JSON."""
    from . import bench

    spec = json.loads(text)
    return (spec["impl"], [bench.Case(**c) for c in spec["cases"]], [bench.Settings(**s) for s in spec["settings"]],
            int(spec["seed"]))


def main() -> int:
    from . import bench

    impl, cases, settings, seed = read_spec(sys.stdin.read())
    results = []
    try:
        for case, s in zip(cases, settings):
            # the parent's inputs, drawn again from the same seed; liger draws its own in torch
            # (dynamic_bench), so its process does no MLX work at all
            inp = None if impl == "liger" else bench.make_inputs(case, seed)
            runner = bench.make_runner(impl, case, inp)
            t = bench.time_runner(runner, case.mode, s.iters, s.warmup, s.repeats)
            results.append({"samples_s": t.samples_s, "note": runner.note})
            del runner, inp
    except bench.BenchError as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps({"results": results}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
