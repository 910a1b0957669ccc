"""Times one implementation on one `mhc bench` case in a process of its own.

`mhc bench` (bench.run) sends the PyTorch peers here (torch, liger), one child process per (case,
peer), so that PyTorch never loads in the process that times MLX: on an H100, with PyTorch and
Triton imported and holding a CUDA context next to MLX, MLX's host-bound small shapes read ~40%
slower (DynamicMHC forward at T = 32: 80 us alone, 119 us with Liger loaded). Any implementation
runs here; the tests time "portable" to check this path on machines without PyTorch.

Protocol (bench.peer_spec, bench.time_in_child): a JSON spec on stdin - impl, the Case's fields,
iters / warmup / repeats, seed; on success one JSON line on stdout, {"samples_s": [...], "note": ...}.
A BenchError (the peer cannot run here, e.g. liger without CUDA) is its message on stderr with exit
code 2; anything else, its traceback. The parent raises either as a BenchError; it never falls back
to timing in its own process.
"""

from __future__ import annotations

import json
import sys


def read_spec(text: str):
    """(impl, Case, Settings, seed) from bench.peer_spec's JSON."""
    from . import bench

    spec = json.loads(text)
    return spec["impl"], bench.Case(**spec["case"]), bench.Settings(**spec["settings"]), int(spec["seed"])


def main() -> int:
    from . import bench

    impl, case, s, seed = read_spec(sys.stdin.read())
    try:
        # the parent's inputs, drawn again from the same seed; liger draws its own in torch
        # (dynamic_bench), so its process does no MLX work at all
        inp = None if impl == "liger" else bench.make_inputs(case, seed)
        runner = bench.make_runner(impl, case, inp)
        t = bench.time_runner(runner, case.mode, s.iters, s.warmup, s.repeats)
    except bench.BenchError as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps({"samples_s": t.samples_s, "note": runner.note}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
