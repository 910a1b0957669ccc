"""Where the dynamic layer's host time goes at small T (device only): the forward of DynamicMHC at
T = 32 is host-bound (README, Status), so this times, in one process and alternating rounds, the
layer and its parts as `mhc bench --layer dynamic` runs them (mx.compile'd, queued calls, one
synchronise), and lists the primitives each compiled call replays.

  python scripts/dynamic_host_probe.py [--T 32] [--n 4] [--C 4096] [--rounds 3]
  python scripts/dynamic_host_probe.py --after 8192:4:4096,4096:4:2048
      # the layer's forward at T as `mhc bench` times it (throughput, its settings), fresh, then after
      # the bench's rows (kernels, portable) of those configs in the same process, as issue 6's run
      # orders them, and after each of: the garbage collector off, its objects frozen, MLX's buffer cache
      # cleared, the ops' compiled-graph caches cleared; each with the host's share (replay, async_eval);
      # --impls kernels (or portable): only those rows before; none: no rows (the control)

Per case: us a call queued (median of batches), of which the replay of the compiled graph (the
call itself) and mx.async_eval (the host's encoding and submission; what is left is waiting for the
GPU), and the primitives of one call's graph by kind (from mx.export_to_dot of its outputs).
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import tempfile
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mhc_aot import bench, dynamic

N, BATCHES = 100, 5


def per_call(fn, args) -> tuple[float, float, float]:
    """(us a call queued with mx.async_eval; of which in the compiled call's replay; in async_eval,
    the host's encoding and submission), medians over batches."""
    for _ in range(3):
        mx.eval(fn(*args))
    mx.synchronize()
    queued, replay, submit = [], [], []
    for _ in range(BATCHES):
        t_replay = t_submit = 0.0
        t0 = time.perf_counter()
        out = None
        for _ in range(N):
            t1 = time.perf_counter()
            out = fn(*args)
            t2 = time.perf_counter()
            mx.async_eval(out)
            t3 = time.perf_counter()
            t_replay += t2 - t1
            t_submit += t3 - t2
        mx.eval(out)
        mx.synchronize()
        queued.append((time.perf_counter() - t0) / N * 1e6)
        replay.append(t_replay / N * 1e6)
        submit.append(t_submit / N * 1e6)
    return statistics.median(queued), statistics.median(replay), statistics.median(submit)


def primitives(fn, args) -> str:
    out = fn(*args)
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *(out if isinstance(out, (list, tuple)) else [out]))
        labels = re.findall(r'label ="([^"]+)"', f.read())
    counts = collections.Counter(labels)
    return f"{sum(counts.values())}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common())


def layer_case(T, n, C, dtype, phi_dtype, backend="auto"):
    layer = bench.dynamic_layer(n, C, backend, phi_dtype)
    names, values = zip(*tree_flatten(layer.trainable_parameters()))

    def fn(x, *p):
        layer.update(tree_unflatten(list(zip(names, p))))
        return layer(x)

    x = mx.random.normal((T, n, C)).astype(dtype)
    mx.eval(x)
    return mx.compile(fn), (x, *values)


def bench_us(T: int, n: int, C: int, impl: str = "kernels") -> float:
    """The dynamic layer's forward median (us) as `mhc bench --layer dynamic --mode throughput` times it."""
    case = bench.Case("throughput", T, n, C, "bfloat16", False, layer="dynamic")
    s = bench.default_settings("throughput")
    runner = bench.make_runner(impl, case, bench.make_inputs(case, bench.INPUT_SEED))
    return bench.time_runner(runner, "throughput", s.iters, s.warmup, s.repeats).median_us


def after(T: int, n: int, C: int, configs: str, impls=("kernels", "portable")) -> None:
    """Issue 6's T = 32 row is slower after the large configs than alone (README, Status): which host
    state it is. Three bench-style medians per state, each line with the host's share of a call."""
    import gc

    from mhc_aot import kernel_ops

    fn, args = layer_case(T, n, C, mx.bfloat16, mx.bfloat16)

    def line(label: str) -> None:
        ts = sorted(bench_us(T, n, C) for _ in range(3))
        q, p, e = per_call(fn, args)
        print(f"  {label:34s} bench {' '.join(f'{t:6.1f}' for t in ts)}   queued {q:6.1f} replay {p:5.1f} "
              f"async_eval {e:5.1f}   gc objects {len(gc.get_objects())} cache {mx.get_cache_memory() / 1e6:.0f} MB",
              flush=True)

    print(f"T={T} n={n} C={C} bfloat16 x and phi, {mx.default_device()}: forward medians (us)")
    line("fresh")
    for cfg in configs.split(","):
        Tb, nb, Cb = (int(v) for v in cfg.split(":"))
        for impl in impls:
            print(f"  ({Tb}, {nb}, {Cb}) {impl}: {bench_us(Tb, nb, Cb, impl):.1f}", flush=True)
    line("after them")
    gc.disable()
    line("garbage collector off")
    gc.enable()
    gc.freeze()
    line("gc.freeze()")
    gc.unfreeze()
    mx.clear_cache()
    line("mx.clear_cache()")
    kernel_ops._compiled.cache_clear()
    line("ops' compiled graphs cleared")
    line("again")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--C", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--after", default=None, help="T:n:C,...: time T after the bench's rows of these configs")
    ap.add_argument("--impls", default="kernels,portable", help="--after's rows (default kernels,portable)")
    a = ap.parse_args()
    if a.after:
        return after(a.T, a.n, a.C, a.after, [i for i in a.impls.split(",") if i != "none"])
    T, n, C, bf = a.T, a.n, a.C, mx.bfloat16
    M = n * n + 2 * n
    layer = bench.dynamic_layer(n, C, "auto", bf)
    x = mx.random.normal((T, n, C)).astype(bf)
    f = mx.random.normal((T, C)).astype(bf)
    ps = (layer.phi, layer.b, layer.alpha_pre, layer.alpha_post, layer.alpha_res)
    h_post, h_res = mx.random.uniform(shape=(T, n)), mx.random.uniform(shape=(T, n, n))
    mx.eval(x, f, h_post, h_res)
    cases = {
        "layer, bf16 phi": layer_case(T, n, C, bf, bf),
        "layer, f32 phi": layer_case(T, n, C, bf, mx.float32),
        "layer, portable": layer_case(T, n, C, bf, bf, "portable"),
        "coeffs+pre op, bf16 phi": (mx.compile(lambda x, *p: dynamic.mhc_coeffs_pre(x, *p)), (x, *ps)),
        "coeffs+pre op, f32 phi": (mx.compile(lambda x, *p: dynamic.mhc_coeffs_pre(x, *p)),
                                   (x, ps[0].astype(mx.float32), *ps[1:])),
        "post_res op": (mx.compile(lambda x, f, hp, hr: dynamic.mhc_post_res(x, f, hp, hr)), (x, f, h_post, h_res)),
        "phi.astype(float32)": (mx.compile(lambda p: p.astype(mx.float32)), (ps[0],)),
        "x + 1 (one MLX kernel)": (mx.compile(lambda x: x + 1), (x,)),
        "nothing (returns x)": (mx.compile(lambda x: nn.Identity()(x)), (x,)),
    }
    print(f"T={T} n={n} C={C} bfloat16 x, M={M}, {mx.default_device()}, queued calls of {N}, median of {BATCHES}")
    for label, (fn, args) in cases.items():
        print(f"  {label:28s} primitives {primitives(fn, args)}")
    rows = collections.defaultdict(list)
    for r in range(a.rounds):
        order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]
        for label, (fn, args) in order:
            rows[label].append(per_call(fn, args))
    for label in cases:
        q, p, e = (sorted(v[i] for v in rows[label]) for i in range(3))
        print(f"  {label:28s} queued " + " ".join(f"{v:7.1f}" for v in q) + "   replay " +
              " ".join(f"{v:6.1f}" for v in p) + "   async_eval " + " ".join(f"{v:6.1f}" for v in e))


if __name__ == "__main__":
    main()
