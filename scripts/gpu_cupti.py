"""The GPU's own record of queued MLX calls (device only): every kernel's start and duration from CUPTI,
through PyTorch's profiler, for scripts/gpu_timeline.py and scripts/gpu_dynamic_ab.py --gpu-time.

The device machine has Nsight Compute but no Nsight Systems, and ncu serialises launches, so neither shows
the gaps between a forward's kernels; CUPTI records every kernel of the process, MLX's graph-launched ones
included. Why A/Bs want it: a wall-clock batch carries the host's start and end and the process's own
speed (sessions 57-62: the same kernels 355-380 µs a call from one process or round to the next, ~8-16 µs
of it outside the GPU), where a kernel's median CUPTI duration over a batch moves by well under a µs
(session 62: coeffs_pre 148.8 / 149.2, post_res 199.8 / 199.8 in two processes).

Only `profile_batch` needs PyTorch; the rest reads the events it returns (plain dicts of the Chrome trace:
name, ts and dur in µs), so it runs, and is tested, without a GPU.
"""

from __future__ import annotations

import json
import os
import statistics

KINDS = ("kernel", "gpu_memset", "gpu_memcpy")  # CUPTI's categories of GPU work in the Chrome trace


def require() -> None:
    """SystemExit unless PyTorch's profiler and a CUDA device are there (a script checks before its long work)."""
    try:
        import torch
        import torch.profiler  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"CUPTI timing needs PyTorch's profiler, which the device machine has: {e}")
    if not torch.cuda.is_available():
        raise SystemExit("CUPTI timing: PyTorch sees no CUDA device (CUPTI records only GPU work)")


def profile_batch(runner, calls: int, path: str):
    """Queue `calls` calls of a bench Runner as the bench's throughput mode does (bench.run_batch) under
    CUPTI. Writes the Chrome trace to `path`; returns (GPU events sorted by start, the batch's host range on
    the same clock or None)."""
    from mhc_aot import bench

    require()
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.init()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.synchronize()
        with record_function("batch"):
            bench.run_batch(runner, calls)
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)["traceEvents"]
    batch = next((e for e in trace if e.get("name") == "batch" and e.get("cat") == "user_annotation"), None)
    return gpu_events(trace), batch


def gpu_events(trace: list[dict]) -> list[dict]:
    """The GPU work of a Chrome trace's events, sorted by start; SystemExit if there is none."""
    events = sorted((e for e in trace if e.get("cat") in KINDS), key=lambda e: e["ts"])
    if not events:
        raise SystemExit("CUPTI recorded no GPU work")
    return events


def launches(events: list[dict]):
    """(event, gap before it) in launch order, µs: the gap runs from the latest end of the work before it, and is
    negative where the event started before that ended (concurrent branches of a graph)."""
    end = events[0]["ts"]
    for e in events:
        yield e, e["ts"] - end
        end = max(end, e["ts"] + e["dur"])


def per_kernel(events: list[dict], width: int = 60) -> dict[str, list[tuple[float, float]]]:
    """{name (its first `width` characters): [(duration, gap before it), ...]} in launch order, µs."""
    out: dict[str, list[tuple[float, float]]] = {}
    for e, gap in launches(events):
        out.setdefault(e["name"][:width], []).append((e["dur"], gap))
    return out


def span(events: list[dict]) -> float:
    """From the first start to the latest end, µs: a batch's GPU time, its gaps included."""
    return max(e["ts"] + e["dur"] for e in events) - events[0]["ts"]


def summary(events: list[dict], calls: int) -> dict[str, float]:
    """{"span": GPU time a call, "<kernel name>": its median duration} over a batch of `calls` calls, µs."""
    out = {"span": span(events) / calls}
    for name, v in per_kernel(events).items():
        out[name] = statistics.median(d for d, _ in v)
    return out


def over_rounds(rounds: list[dict[str, float]]) -> tuple[list[float], str]:
    """Rounds' summaries -> (their GPU times a call, sorted; "name median; ..." of each kernel's median duration
    over the rounds), as the A/B scripts print them."""
    kernels = sorted({k for r in rounds for k in r if k != "span"})
    durs = "; ".join(f"{k} {statistics.median(r[k] for r in rounds if k in r):.1f}" for k in kernels)
    return sorted(r["span"] for r in rounds), durs


def trace_path(stem: str) -> str:
    """Where a script writes its Chrome trace: $OUT (the device tool's folder) or the working directory."""
    return os.path.join(os.environ.get("OUT", "."), f"{stem}.json")
