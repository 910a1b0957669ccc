"""Stage timings of the layer as a Chrome / Perfetto trace, for `mhc profile`.

Stages of the static layer: `sinkhorn` (ops.sinkhorn alone), `forward` (ops.mhc_forward, Sinkhorn
included) and `backward` (mx.vjp with dout as the output's cotangent, w.r.t. x and all four
parameters: the forward and backward of one training step, as `mhc bench --backward` times it). Of the dynamic layer (DynamicMHC around an identity F,
as `mhc bench --layer dynamic`): `coeffs` (mhc_coeffs_pre: coefficients and x_in), `post_res`
(mhc_post_res), `forward` (the layer) and `backward` (mx.vjp w.r.t. x and phi, b, alphas), phi in
x's dtype as the bench's default.
Every call is timed between synchronisations (mx.synchronize, then the call and mx.eval of its
result, then mx.synchronize), so one event is one call's wall
time on the device, queueing included. The trace is the Trace Event Format's JSON object form:
{"traceEvents": [...]} of complete ("X") events, ts and dur in microseconds, one thread per
stage; open it in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from . import bench, device, dispatch, ops

STAGES = ("sinkhorn", "forward", "backward")
DYNAMIC_STAGES = ("coeffs", "post_res", "forward", "backward")
PID = 1


def stage_functions(B: int, n: int, C: int, dtype: str = bench.DEFAULT_DTYPE, backend: str = "auto",
                    seed: int = 0, layer: str = "static") -> dict[str, Callable[[], object]]:
    inp = bench.make_inputs(bench.Case("latency", B, n, C, dtype, True, layer), seed)
    if layer == "dynamic":
        return _dynamic_stage_functions(inp, backend)
    p = inp.params

    def fn(x, *q):
        return ops.mhc_forward(x, *q, backend=backend)

    vjp = mx.compile(lambda x, *q: mx.vjp(fn, [x, *q], [inp.dout]))
    return {
        "sinkhorn": lambda: ops.sinkhorn(p["H_res_raw"], backend=backend),
        "forward": lambda: ops.mhc_forward(inp.x, **p, backend=backend),
        "backward": lambda: vjp(*inp.args),
    }


def _dynamic_stage_functions(inp, backend: str) -> dict[str, Callable[[], object]]:
    from . import dynamic

    _, n, C = inp.x.shape
    layer = bench.dynamic_layer(n, C, backend, inp.x.dtype)  # phi in x's dtype, as mhc bench's default
    coeff_args = (layer.phi, layer.b, layer.alpha_pre, layer.alpha_post, layer.alpha_res)
    _, h_post, h_res, x_in = dynamic.mhc_coeffs_pre(inp.x, *coeff_args, backend=backend)
    mx.eval(h_post, h_res, x_in)

    names, values = zip(*tree_flatten(layer.trainable_parameters()))

    def fn(x, *p):
        layer.update(tree_unflatten(list(zip(names, p))))  # parameters as traced inputs
        return layer(x)

    vjp = mx.compile(lambda x, *p: mx.vjp(fn, [x, *p], [inp.dout]))
    return {
        "coeffs": lambda: dynamic.mhc_coeffs_pre(inp.x, *coeff_args, backend=backend),
        "post_res": lambda: dynamic.mhc_post_res(inp.x, x_in, h_post, h_res, backend=backend),
        "forward": lambda: layer(inp.x),
        "backward": lambda: vjp(inp.x, *values),
    }


def record(fns: dict[str, Callable[[], object]], iters: int, warmup: int,
           on_step: Optional[Callable[[str], None]] = None, args: Optional[dict] = None) -> list[dict]:
    """Trace events of `warmup` (cat "warmup") then `iters` (cat "mhc") synchronised calls per stage."""
    events = [{"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "args": {"name": "mhc-aot"}}]
    origin = time.perf_counter()
    for tid, (stage, fn) in enumerate(fns.items(), start=1):
        events.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": stage}})
        for i in range(warmup + iters):
            if on_step:
                on_step(stage)
            mx.synchronize()
            t0 = time.perf_counter()
            with device.nvtx_range(f"mhc/{stage}"):  # names the stage's kernels in Nsight tools
                mx.eval(fn())
                mx.synchronize()
            t1 = time.perf_counter()
            warm = i < warmup
            events.append({
                "name": stage, "cat": "warmup" if warm else "mhc", "ph": "X", "pid": PID, "tid": tid,
                "ts": (t0 - origin) * 1e6, "dur": max((t1 - t0) * 1e6, 1e-3),
                "args": {**(args or {}), "call": i - warmup if not warm else i, "warmup": warm},
            })
    return events


def summary(events: list[dict]) -> list[dict]:
    """Per stage: timed calls, median / p20 / p80 / total microseconds (warmup calls left out)."""
    rows = []
    for stage in dict.fromkeys(e["name"] for e in events if e.get("ph") == "X"):
        durs = [e["dur"] for e in events if e.get("ph") == "X" and e["name"] == stage and e["cat"] == "mhc"]
        warm = [e["dur"] for e in events if e.get("ph") == "X" and e["name"] == stage and e["cat"] == "warmup"]
        if not durs:
            continue
        rows.append({"stage": stage, "calls": len(durs), "median_us": statistics.median(durs),
                     "p20_us": bench.percentile(durs, 20), "p80_us": bench.percentile(durs, 80),
                     "total_us": sum(durs), "first_call_us": warm[0] if warm else durs[0]})
    return rows


def strategies(B: int, n: int, C: int, backend: str = "auto", layer: str = "static", dtype: str | None = None) -> dict:
    if backend in ("portable", "reference"):
        return {s: backend for s in (DYNAMIC_STAGES if layer == "dynamic" else STAGES)}
    if layer == "dynamic":
        ex = {op: dispatch.explain(op, n, C, backend, B=B) for op in ("mhc_coeffs", "mhc_post_res")}
        both = "the coeffs and post_res choices above"
        return {"coeffs": ex["mhc_coeffs"], "post_res": ex["mhc_post_res"], "forward": both, "backward": both}
    return {
        "sinkhorn": dispatch.explain("sinkhorn", n, 1, backend),
        "forward": dispatch.explain("mhc_forward", n, C, backend, B=B, dtype=dtype),
        "backward": dispatch.explain("mhc_backward", n, C, backend, B=B, dtype=dtype),
    }


def write_trace(events: list[dict], path, meta: Optional[dict] = None) -> None:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta or {}}, f, indent=1)
