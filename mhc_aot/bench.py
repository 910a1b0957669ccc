"""The one benchmark (DESIGN.md section 6): shape tables, implementations, timing, byte model.

`mhc bench` wraps this module; scripts call `run()` the same way, so every number the project
quotes comes from one place.

Shapes (the seed `mhc-mlx` README's tables, plus a large suite):
  latency     B = 1, n = 32, C in 256, 1024, 2048, 4096, 8192
  throughput  B = 32 with (n, C) in (32, 2048), (32, 512), (4, 4096)
  large       (B, n, C) in (4096, 4, 4096), (1024, 32, 2048)
  dynamic     (--layer dynamic) the paper's n = 4: latency B = 1, C as above; throughput B = 32,
              C in 512, 2048, 4096; large as above

Modes:
  latency     every call evaluated (`mx.eval`) before the next; one sample per call.
  throughput  `iters` calls queued with `mx.async_eval` and one synchronise at the end; one
              sample (elapsed / iters) per batch, `repeats` batches. Outputs are not kept alive,
              so memory stays at about one call's worth.
Each row reports the median and the 20th / 80th percentiles of its samples in microseconds.

Byte model (effective GB/s = bytes / median time), with s = itemsize of x's dtype, E = B * n * C:
  forward            x read once + out written once                                  = 2 E s
  forward+backward   forward (x read, out written) + backward (x and dout read, dx written)
                                                                                      = 5 E s
  dynamic layer      adds phi [n C, n n + 2 n] (P elements of its dtype's size p): + p P forward
                     (read once), + 3 p P forward+backward (read in each pass, dphi written);
                     the per-token coefficients and x_in / f_out ([B, C]) are left out.
  Static parameters, M and per-token scalars are O(n^2 + C) and left out. This is the traffic of an
  ideal fused implementation, the same for every implementation, so GB/s ranks them on one
  footing. `copy_fraction` divides it by the copy bandwidth measured once per run (a float32
  buffer, `y = x + 1`: read once + written once), not by a datasheet number.

Implementations:
  kernels    ops.mhc_forward(backend="auto"): the precompiled kernels on a GPU backend; on MLX's
             CPU backend "auto" IS the portable path (MLX has no custom-kernel primitive there).
  portable   backend="portable": MLX ops, mx.compile'd per static argument set.
  reference  mx.compile of mhc_aot.reference.mhc_forward (the readable reference), as DESIGN.md
             section 6 asks; its backward is mx.compile(mx.vjp(...)).
  seed       mhc-mlx's compiled reference: MHCLayer(n, C, use_metal=False, compile_reference=True).
  torch      a torch.compile'd PyTorch implementation of the same layer, on CUDA when PyTorch
             sees a GPU, else on its CPU.
With --layer dynamic the rows time DynamicMHC(nn.Identity(), n, C) (the mHC machinery alone) with
backend auto / portable / reference, forward and forward + backward mx.compile'd alike, and
  liger      Liger-Kernel's LigerMHC functional chain (liger_mhc_coeffs + liger_mhc_pre +
             liger_mhc_post_res, Triton) on CUDA, F = identity, same shapes and dtype, phi in x's
             dtype (its own benchmark's choice);
phi's dtype in the dynamic rows (Case.phi_dtype, `mhc bench --phi-dtype`): x's by default, as the
liger peer's, so both time one configuration; float32 (DynamicMHC's default) on request.
seed and torch have no dynamic layer, liger has no static one.
The PyTorch peers (torch, liger) are timed in a child process each (mhc_aot/peer_worker.py), one
per peer for all cases, after the in-process rows, in the same run and on the same seeded inputs,
so neither framework's runtime sits in the process that times the other; this process never
imports torch.
Backward = forward + backward: mx.compile of mx.vjp with dout (fixed, x's dtype) as the output's
cotangent, w.r.t. x and all four parameters (the dynamic rows: x, phi, b and the three alphas), as the
PyTorch peers' torch.autograd.grad(out, leaves, dout). No loss is formed: a sum(out * dout) would add
passes over out and dout that are not the layer's work and that the byte model does not count.
The forward is mx.compile'd too, for every MLX implementation alike (seed: its own compiled layer).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from . import dispatch, ops, reference, testing

LATENCY_C = (256, 1024, 2048, 4096, 8192)
LATENCY_SHAPES = tuple((1, 32, C) for C in LATENCY_C)
THROUGHPUT_SHAPES = ((32, 32, 2048), (32, 32, 512), (32, 4, 4096))
LARGE_SHAPES = ((4096, 4, 4096), (1024, 32, 2048))
SUITES = {"latency": LATENCY_SHAPES, "throughput": THROUGHPUT_SHAPES, "large": LARGE_SHAPES}
# Dynamic mHC (--layer dynamic): the paper's n = 4; phi is [n C, n n + 2 n], 1 GiB at n = 32, C = 8192.
DYNAMIC_SUITES = {"latency": tuple((1, 4, C) for C in LATENCY_C),
                  "throughput": ((32, 4, 512), (32, 4, 2048), (32, 4, 4096)), "large": LARGE_SHAPES}
LAYERS = ("static", "dynamic")

MODES = ("latency", "throughput")
IMPLEMENTATIONS = ("kernels", "portable", "reference", "seed", "torch", "liger")
COMPARISONS = IMPLEMENTATIONS[1:]
DEFAULT_COMPARE = ("reference",)
DEFAULT_DTYPE = "bfloat16"
PARAM_NAMES = ("H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight")


class BenchError(ValueError):
    """A request that cannot run (shape too large for memory, comparison not installed): the
    message names the cause and the fix."""


def default_shapes(mode: str, layer: str = "static") -> tuple[tuple[int, int, int], ...]:
    return (DYNAMIC_SUITES if layer == "dynamic" else SUITES)[mode]


@dataclass(frozen=True)
class Settings:
    iters: int  # latency: timed calls; throughput: calls per batch
    warmup: int
    repeats: int  # throughput batches (latency: 1)


def default_settings(mode: str, backend: Optional[str] = None) -> Settings:
    """Modest on MLX's CPU backend (the default tables finish in well under a minute there),
    enough calls on a GPU for stable medians."""
    gpu = (backend or dispatch.device_backend()) != "cpu"
    if mode == "latency":
        return Settings(iters=200 if gpu else 15, warmup=20 if gpu else 2, repeats=1)
    return Settings(iters=50 if gpu else 5, warmup=10 if gpu else 1, repeats=7 if gpu else 5)


@dataclass(frozen=True)
class Case:
    mode: str
    B: int
    n: int
    C: int
    dtype: str = DEFAULT_DTYPE
    backward: bool = False
    layer: str = "static"  # "static" (MHCLayer / ops.mhc_forward) or "dynamic" (DynamicMHC, F = identity)
    phi_dtype: Optional[str] = None  # the dynamic layer's phi; None: x's dtype, as the liger peer's (see .phi)

    @property
    def elements(self) -> int:
        return self.B * self.n * self.C

    @property
    def phi_elements(self) -> int:
        return self.n * self.C * (self.n * self.n + 2 * self.n) if self.layer == "dynamic" else 0

    @property
    def phi(self) -> str:
        """The dynamic layer's phi dtype: phi_dtype, else x's."""
        return self.phi_dtype or self.dtype

    @property
    def itemsize(self) -> int:
        return testing.DTYPES[self.dtype].size

    @property
    def bytes_moved(self) -> int:
        """The byte model of the module docstring: 2 E s forward, 5 E s forward+backward; the
        dynamic layer adds phi: read once forward, read again and dphi written backward."""
        x_bytes = (5 if self.backward else 2) * self.elements * self.itemsize
        return x_bytes + (3 if self.backward else 1) * testing.DTYPES[self.phi].size * self.phi_elements

    @property
    def label(self) -> str:
        layer = f" dynamic (phi {self.phi})" if self.layer == "dynamic" else ""
        return f"B={self.B} n={self.n} C={self.C} {self.dtype}{layer}{' fwd+bwd' if self.backward else ''}"


# ---------------------------------------------------------------- memory
def estimate_bytes(case: Case, impl: str) -> int:
    """Rough peak bytes of one call: x (and dout), out (and dx) in x's dtype plus float32
    temporaries; the readable reference (and the seed's) also materialises an [B, n, n, C]
    float32 broadcast in its stream mix."""
    E, s = case.elements, case.itemsize
    per = (4 * s + 32) if case.backward else (2 * s + 12)
    total = E * per + 4 * case.phi_elements * (3 if case.backward else 1)
    if impl in ("reference", "seed"):
        total += E * case.n * 4 * (2 if case.backward else 1)
    return total


def available_memory() -> tuple[Optional[int], str]:
    """(bytes the benchmark may use, where that number comes from); (None, why) if unknown."""
    if dispatch.device_backend() != "cpu":
        info = mx.device_info()
        for key in ("free_memory", "memory_size", "total_memory"):  # CUDA reports free_memory
            if isinstance(info.get(key), int) and info[key] > 0:
                return int(info[key]), f"mx.device_info()['{key}']"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    info = mx.device_info()
    if isinstance(info.get("memory_size"), int):
        return int(info["memory_size"]), "mx.device_info()['memory_size']"
    return None, "unknown"


MEMORY_HEADROOM = 0.9  # use at most this fraction of what is available


def check_memory(cases, impls) -> None:
    """BenchError naming the first (case, implementation) whose estimate does not fit."""
    avail, source = available_memory()
    if avail is None:
        return
    for case in cases:
        for impl in impls:
            need = estimate_bytes(case, impl)
            if need > MEMORY_HEADROOM * avail:
                fix = ("drop it from --compare or pick a smaller shape" if impl != "kernels"
                       else "pick smaller --B/--n/--C")
                raise BenchError(f"{case.label} needs ~{need / 2**30:.1f} GiB for {impl} but "
                                 f"{avail / 2**30:.1f} GiB is available ({source}): {fix}")


# ---------------------------------------------------------------- timing
def percentile(values, q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), q in [0, 100]."""
    v = sorted(values)
    if not v:
        return math.nan
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass
class Timing:
    samples_s: list[float]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_s) * 1e6

    @property
    def p20_us(self) -> float:
        return percentile(self.samples_s, 20) * 1e6

    @property
    def p80_us(self) -> float:
        return percentile(self.samples_s, 80) * 1e6


@dataclass
class Runner:
    """One implementation bound to one case's inputs: what to call and how to wait for it."""
    name: str
    call: Callable[[], Any]
    evaluate: Callable[[Any], None] = mx.eval  # block until this call's result exists
    enqueue: Callable[[Any], None] = mx.async_eval  # start it without waiting
    synchronize: Callable[[], None] = mx.synchronize  # wait for everything queued
    note: str = ""


def time_runner(runner: Runner, mode: str, iters: int, warmup: int, repeats: int = 1) -> Timing:
    for _ in range(warmup):
        runner.evaluate(runner.call())
    runner.synchronize()
    samples = []
    if mode == "latency":
        for _ in range(iters * max(1, repeats)):
            t0 = time.perf_counter()
            runner.evaluate(runner.call())
            samples.append(time.perf_counter() - t0)
    else:
        for _ in range(repeats):
            runner.synchronize()
            t0 = time.perf_counter()
            run_batch(runner, iters)
            samples.append((time.perf_counter() - t0) / iters)
    return Timing(samples)


def run_batch(runner: Runner, iters: int) -> None:
    """Throughput mode's batch: `iters` calls queued, the last one evaluated, then everything synchronised
    (scripts/gpu_cupti.py profiles the same batch)."""
    out = None
    for _ in range(iters):
        out = runner.call()
        runner.enqueue(out)
    runner.evaluate(out)
    runner.synchronize()


def measure_copy_bandwidth(nbytes: Optional[int] = None, iters: int = 10) -> float:
    """GB/s of `y = x + 1` on a float32 buffer (read once + written once), calls queued as in
    throughput mode: the device's practical copy bandwidth, measured once per run. (Evaluating each
    call alone would add MLX's per-call floor to the time: ~2.0 instead of ~2.9 TB/s on the H100.)"""
    gpu = dispatch.device_backend() != "cpu"
    nbytes = nbytes or (256 if gpu else 64) * 2**20
    x = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(x)
    runner = Runner("copy", lambda: x + 1)
    t = time_runner(runner, "throughput", iters, 2, repeats=3)
    return 2 * nbytes / (t.median_us * 1e-6) / 1e9


# The shape of DynamicMHC's projection vec(x) @ phi at T = 256, n = 4, C = 1024.
MATMUL_SHAPE = (256, 4096, 24)
# GFLOP/s below which a CPU run's notes point to README's "MLX's CPU matmuls on Linux": the `mlx-cpu`
# wheel's netlib reference BLAS measured ~5 on this project's 2-core machine, OpenBLAS ~145.
SLOW_CPU_MATMUL_GFLOPS = 20.0


def measures_matmul_rate() -> bool:
    """Whether run() measures MLX's matmul rate (on MLX's CPU backend only, where its BLAS sets the
    portable path's speed); the CLI's progress bar counts that step."""
    return dispatch.device_backend() == "cpu"


def measure_matmul_gflops(iters: int = 10) -> float:
    """GFLOP/s of a float32 [256, 4096] @ [4096, 24] (MATMUL_SHAPE), calls queued. On MLX's CPU
    backend every matmul of the portable path goes through the BLAS MLX links, whose speed varies by
    ~30x between builds (README, "MLX's CPU matmuls on Linux"), so a CPU run reports it."""
    T, K, M = MATMUL_SHAPE
    a, b = mx.random.normal((T, K)), mx.random.normal((K, M))
    mx.eval(a, b)
    t = time_runner(Runner("matmul", lambda: a @ b), "throughput", iters, 2, repeats=3)
    return 2 * T * K * M / (t.median_us * 1e-6) / 1e9


# ---------------------------------------------------------------- implementations
@dataclass
class Inputs:
    x: mx.array
    params: dict
    dout: mx.array

    @property
    def args(self) -> tuple:
        return (self.x, *(self.params[k] for k in PARAM_NAMES))


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Non-trivial parameters (not the identity init) and x, dout in the case's dtype."""
    p = testing.random_params(case.n, case.C, seed)
    x = testing.random_input((case.B, case.n, case.C), testing.DTYPES[case.dtype], seed)
    dout = testing.random_input(x.shape, x.dtype, seed + 1)
    mx.eval(x, dout, *p.values())
    return Inputs(x, p, dout)


def _forward_and_vjp(fn, dout):
    """mx.compile of the forward and of its VJP with dout as the output's cotangent, w.r.t. x and
    all four parameters: what a training step runs for this layer, and the traffic the byte model
    counts. No loss is formed: sum(out * dout) would add a pass over out and dout (and MLX's
    backward of it another over dout) that is not the layer's work (H100, (4096, 4, 4096) bf16: 287 us
    of the 591 a value_and_grad of that loss took)."""
    return mx.compile(lambda x, *p: mx.vjp(fn, [x, *p], [dout]))


def _reference_forward(x, *p):
    return reference.mhc_forward(x, *p).astype(x.dtype)


def _mlx_runner(name: str, fn, case: Case, inp: Inputs, note: str = "") -> Runner:
    """Forward and forward + backward mx.compile'd (as a model's step would be: the op's Python -
    checks, dispatch - runs once per shape, not per call), for every MLX implementation alike."""
    if case.backward:
        vjp = _forward_and_vjp(fn, inp.dout)
        return Runner(name, lambda: vjp(*inp.args), note=note)
    fwd = mx.compile(fn)
    return Runner(name, lambda: fwd(*inp.args), note=note)


def availability(name: str, layer: str = "static") -> Optional[str]:
    """None if implementation `name` can run here, else why not and the fix. The PyTorch peers'
    packages are looked up (find_spec), not imported: torch must not load in the process that times
    MLX. What only importing can tell (liger's CUDA device, a broken install) comes from the peer's
    child process, as a BenchError carrying its stderr."""
    if layer == "dynamic":
        import mhc_aot

        if not hasattr(mhc_aot, "DynamicMHC"):
            return "this build of mhc-aot has no DynamicMHC"
        if name in ("seed", "torch"):
            return f"{name} has no dynamic mHC layer to compare with: use portable, reference or liger"
        if name == "liger":
            return _liger_unavailable()
    elif name == "liger":
        return "liger (LigerMHC) has only a dynamic mHC layer: use it with --layer dynamic"
    if name in ("kernels", "portable", "reference"):
        return None
    if name == "seed":
        try:
            _import_seed()
        except ImportError:
            return "mhc-mlx is not installed: pip install 'mhc-mlx==0.6.3' (or mhc-aot[test])"
        return None
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed: pip install torch"
        return None
    return f"unknown implementation {name!r}: expected one of {', '.join(IMPLEMENTATIONS)}"


def _liger_unavailable() -> Optional[str]:
    missing = [m for m in ("torch", "liger_kernel") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"liger needs PyTorch and liger-kernel ({', '.join(missing)} not installed): "
                "pip install 'liger-kernel==0.8.5'")
    return None  # CUDA is checked in the child (dynamic_bench.liger_runner)


def _import_seed():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that Linux runs its pure-MLX path
        import mhc_mlx
    return mhc_mlx


def _strategy_of(op: str, case: Case) -> str:
    try:
        return dispatch.choose(op, case.n, case.C, "auto", B=case.B).strategy
    except ValueError:  # dynamic ops have no CPU rows yet: the CPU runs their portable path
        return "portable" if dispatch.device_backend() == "cpu" else "no rule"


def kernels_note(case: Case) -> str:
    """What backend='auto' runs for this case (dispatch's choice)."""
    if case.layer == "dynamic":
        text = f"{dispatch.device_backend()}:" + "/".join(
            _strategy_of(op, case) for op in ("mhc_coeffs", "mhc_pre", "mhc_post_res"))
        if dispatch.device_backend() == "cuda":  # the layer's coefficients and x_in: which kernels
            from . import cuda_dynamic, dynamic

            text += " (" + cuda_dynamic.coeffs_path(case.B, case.n, case.C, testing.DTYPES[case.dtype],
                                                    testing.DTYPES[case.phi], dynamic.Config().tmax, True) + ")"
        return text
    c = dispatch.choose("mhc_forward", case.n, case.C, "auto", B=case.B, dtype=case.dtype)
    text = f"{c.backend}:{c.strategy}"
    if case.backward:
        b = dispatch.choose("mhc_backward", case.n, case.C, "auto", B=case.B, dtype=case.dtype)
        text += f" / bwd {b.strategy}"
    return text


def make_runner(name: str, case: Case, inp: Inputs, layers: int = 1) -> Runner:
    """layers: DynamicMHC layers a call, for the dynamic layer's MLX rows only (scripts/gpu_dynamic_ab.py)."""
    why = availability(name, case.layer)
    if why:
        raise BenchError(why)
    if layers != 1 and (case.layer != "dynamic" or name == "liger"):
        raise ValueError(f"layers: got {layers} for {name!r} on the {case.layer} layer; a stack of layers is "
                         f"timed for the dynamic layer's MLX implementations only (pass layers=1)")
    if case.layer == "dynamic":
        if name == "liger":
            from .dynamic_bench import liger_runner

            return liger_runner(case)
        return _dynamic_runner(name, case, inp, layers)
    if name in ("kernels", "portable"):
        backend = "auto" if name == "kernels" else "portable"

        def fn(x, *p):
            return ops.mhc_forward(x, *p, backend=backend)

        return _mlx_runner(name, fn, case, inp,
                           note=kernels_note(case) if name == "kernels" else f"{dispatch.device_backend()}:portable")
    if name == "reference":
        return _mlx_runner(name, _reference_forward, case, inp, note="mx.compile")  # compiled there
    if name == "seed":
        return _seed_runner(case, inp)
    return _torch_runner(case, inp)


def _seed_runner(case: Case, inp: Inputs) -> Runner:
    mhc_mlx = _import_seed()
    layer = mhc_mlx.MHCLayer(case.n, case.C, use_metal=False, compile_reference=True)
    layer.update({k: inp.params[k] for k in PARAM_NAMES})
    note = f"mhc-mlx {getattr(mhc_mlx, '__version__', '')} compiled reference".replace("  ", " ")
    if not case.backward:
        return Runner("seed", lambda: layer(inp.x), note=note)

    def fn(x, *p):
        layer.update(dict(zip(PARAM_NAMES, p)))  # what nn.value_and_grad does: parameters as traced inputs
        return layer(x)

    vjp = mx.compile(lambda x, *p: mx.vjp(fn, [x, *p], [inp.dout]))
    return Runner("seed", lambda: vjp(*inp.args), note=note)


def dynamic_layer(n: int, C: int, backend: str = "auto", phi_dtype: mx.Dtype = mx.float32):
    """DynamicMHC(nn.Identity(), n, C) with non-trivial b and alphas (not the init's zeros and ones)
    and phi in `phi_dtype`, evaluated: what the dynamic rows and `mhc profile --layer dynamic` run."""
    import mlx.nn as nn

    from . import DynamicMHC

    layer = DynamicMHC(nn.Identity(), n, C, backend=backend, key=mx.random.key(1), phi_dtype=phi_dtype)
    layer.b = 0.5 * mx.random.normal((n * n + 2 * n,), key=mx.random.key(2))
    layer.alpha_pre, layer.alpha_post, layer.alpha_res = (mx.array(a, mx.float32) for a in (1.1, 0.9, 1.3))
    mx.eval(layer.parameters())
    return layer


def _dynamic_runner(name: str, case: Case, inp: Inputs, layers: int = 1) -> Runner:
    """DynamicMHC around F = identity, so only the mHC machinery is timed; non-trivial b and alphas.
    Forward and forward + backward are mx.compile'd for every MLX implementation alike, as a model's
    step would be (the layer's Python - checks, dispatch - then runs once per shape, not per call).
    layers > 1 (scripts/gpu_dynamic_ab.py --layers): that many layers a call, x through each in turn,
    each with its own parameters and scratch, as in a model."""
    backend = {"kernels": "auto", "portable": "portable", "reference": "reference"}[name]
    stack = [dynamic_layer(case.n, case.C, backend, testing.DTYPES[case.phi]) for _ in range(layers)]
    names = [[k for k, _ in tree_flatten(layer.trainable_parameters())] for layer in stack]
    values = [v for layer in stack for _, v in tree_flatten(layer.trainable_parameters())]

    def fn(x, *p):
        at = 0
        for layer, keys in zip(stack, names):
            layer.update(tree_unflatten(list(zip(keys, p[at:at + len(keys)]))))  # parameters as traced inputs
            at += len(keys)
            x = layer(x)
        return x

    note = (kernels_note(case) if name == "kernels" else f"{dispatch.device_backend()}:portable"
            if name == "portable" else "reference") + (f", {layers} layers a call" if layers > 1 else "")
    if case.backward:
        # the VJP with dout as the output's cotangent, as LigerMHC's torch.autograd.grad(out, leaves, G):
        # no loss is formed (a sum(out * dout) would add a pass over out and dout to MLX's rows only)
        vjp = mx.compile(lambda x, *p: mx.vjp(fn, [x, *p], [inp.dout]))
        return Runner(name, lambda: vjp(inp.x, *values), note=note)
    fwd = mx.compile(fn)
    return Runner(name, lambda: fwd(inp.x, *values), note=note)


def torch_forward(x, H_pre_raw, H_post_raw, H_res_raw, rms_weight, iters: int = reference.DEFAULT_ITERS,
                  eps: float = reference.DEFAULT_EPS):
    """DESIGN.md section 1 in PyTorch (float32 accumulation, output in x's dtype)."""
    import torch

    xf = x.float()
    H_pre, H_post = torch.sigmoid(H_pre_raw), 2.0 * torch.sigmoid(H_post_raw)
    P = torch.exp(H_res_raw - H_res_raw.amax(dim=1, keepdim=True))
    for _ in range(iters):
        r = P.sum(dim=1, keepdim=True)
        P = P * torch.where(r > eps, 1.0 / r, torch.ones_like(r))
        c = P.sum(dim=0, keepdim=True)
        P = P * torch.where(c > eps, 1.0 / c, torch.zeros_like(c))
    agg = torch.matmul(H_pre, xf)  # [B, C]
    y = agg * torch.rsqrt(agg.pow(2).mean(dim=-1, keepdim=True) + eps) * rms_weight
    out = torch.matmul(P, xf) + H_post[None, :, None] * y[:, None, :]
    return out.to(x.dtype)


def torch_runner(name: str, call: Callable[[], Any], note: str) -> Runner:
    """A Runner for PyTorch work (torch.compile, LigerMHC): torch queues on its own stream, so
    evaluating is synchronising the CUDA device (nothing to wait for on torch's CPU)."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return Runner(name, call, evaluate=lambda _: sync(), enqueue=lambda _: None, synchronize=sync, note=note)


def _torch_runner(case: Case, inp: Inputs) -> Runner:
    import numpy as np
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[case.dtype]

    def to_torch(a, dtype, grad=False):
        t = torch.from_numpy(np.array(a.astype(mx.float32))).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    x = to_torch(inp.x, tdtype, case.backward)
    params = [to_torch(inp.params[k], torch.float32, case.backward) for k in PARAM_NAMES]
    dout = to_torch(inp.dout, tdtype)
    fwd = torch.compile(torch_forward)

    if case.backward:
        def call():
            out = fwd(x, *params)
            return torch.autograd.grad(out, [x, *params], dout)  # dout as out's cotangent, no loss
    else:
        def call():
            with torch.no_grad():
                return fwd(x, *params)

    return torch_runner("torch", call, note=f"torch {torch.__version__} torch.compile on {device}")


# ---------------------------------------------------------------- peers in a child process
CHILD_IMPLS = ("torch", "liger")  # timed by peer_worker: one child process per peer and run
PEER_WORKER = [sys.executable, "-m", "mhc_aot.peer_worker"]
INPUT_SEED = 0  # run()'s inputs; the child draws the same ones from it


def peer_spec(impl: str, cases, settings, seed: int = INPUT_SEED) -> dict:
    """What peer_worker needs to rebuild the cases, their inputs and the timing loops (settings:
    one per case)."""
    return {"impl": impl, "cases": [asdict(c) for c in cases], "settings": [asdict(s) for s in settings],
            "seed": seed}


def time_in_child(impl: str, cases, settings, seed: int = INPUT_SEED) -> list[tuple[Timing, str]]:
    """(timing, note) per case of `impl`, timed by peer_worker in one child process (one process
    for all cases: a peer's JIT and autotuning caches live in its process, as they would in a
    user's). A child that fails or prints no result is a BenchError with its exit code and stderr:
    never timed here instead."""
    cases = list(cases)
    mx.clear_cache()  # MLX's cached buffers back to the device, so the child has its memory
    p = subprocess.run(PEER_WORKER, input=json.dumps(peer_spec(impl, cases, settings, seed)),
                       capture_output=True, text=True, check=False)
    lines = p.stdout.strip().splitlines()
    what = f"exited with code {p.returncode}" if p.returncode else "printed no result"
    if p.returncode == 0 and lines:
        try:
            results = json.loads(lines[-1])["results"]
            out = [(Timing([float(v) for v in r["samples_s"]]), str(r.get("note", ""))) for r in results]
            if len(out) == len(cases) and all(t.samples_s for t, _ in out):
                return out
            what = f"printed {len(out)} results for {len(cases)} cases (or an empty one)"
        except (ValueError, TypeError, KeyError) as e:
            what = f"printed no result ({type(e).__name__}: {e}; last line {lines[-1][-200:]!r})"
    tail = p.stderr.strip()[-3000:] or "(nothing on stderr)"
    labels = ", ".join(c.label for c in cases)
    raise BenchError(f"{impl} on {labels}, timed in a child process ({' '.join(PEER_WORKER)}), {what}:\n{tail}")


# ---------------------------------------------------------------- the benchmark
def make_cases(mode: str, shapes, dtypes, backward: bool, layer: str = "static",
               phi_dtype: Optional[str] = None) -> list[Case]:
    """Every (dtype, shape) case; the dynamic layer's phi in `phi_dtype` (None: each case's x dtype, as
    the liger peer's phi)."""
    return [Case(mode, B, n, C, dt, backward, layer, phi_dtype) for dt in dtypes for (B, n, C) in shapes]


@dataclass
class Run:
    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def run_meta(copy_gbps: float, settings: Settings, compare, matmul_gflops: Optional[float] = None) -> dict:
    info = mx.device_info()
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "backend": dispatch.device_backend(),
        "device_name": info.get("device_name", ""),
        "architecture": info.get("architecture", ""),
        "copy_GBps": copy_gbps,
        # MLX's float32 matmul rate (CPU runs only: measure_matmul_gflops)
        "matmul_GFLOPs": matmul_gflops,
        # MLX_USE_CUDA_GRAPHS: how MLX launches every row's kernels (and whether `cluster` may run)
        "cuda_graphs": dispatch.cuda_graphs() if dispatch.device_backend() == "cuda" else None,
        "compare": list(compare),
        **asdict(settings),
    }


def run(cases, compare=DEFAULT_COMPARE, settings: Optional[Settings] = None,
        on_step: Optional[Callable[[str], None]] = None, copy_gbps: Optional[float] = None,
        matmul_gflops: Optional[float] = None) -> Run:
    """Time the kernels row and every comparison on every case. One row per (case, implementation);
    the kernels row carries `speedup_vs_<name>` = median(name) / median(kernels) for each comparison."""
    compare = [c for c in dict.fromkeys(compare) if c != "kernels"]
    cases = list(cases)
    for c in ["kernels", *compare]:
        for layer in {case.layer for case in cases}:
            why = availability(c, layer)
            if why:
                raise BenchError(f"--compare {c}: {why}" if c != "kernels" else why)
    impls = ["kernels", *compare]
    check_memory(cases, impls)
    step = on_step or (lambda _msg: None)
    step("measuring copy bandwidth")
    copy_gbps = copy_gbps or measure_copy_bandwidth()
    if measures_matmul_rate() and matmul_gflops is None:
        step("measuring MLX's CPU matmul rate")
        matmul_gflops = measure_matmul_gflops()
    result = Run()
    in_process = [i for i in impls if i not in CHILD_IMPLS]
    rows: dict[tuple[int, str], dict] = {}

    def add_row(ci: int, impl: str, t: Timing, note: str) -> None:
        case = cases[ci]
        gbps = case.bytes_moved / (t.median_us * 1e-6) / 1e9
        rows[ci, impl] = {
            "mode": case.mode, "layer": case.layer, "impl": impl,
            "B": case.B, "n": case.n, "C": case.C, "dtype": case.dtype,
            **({"phi_dtype": case.phi if impl != "liger" else case.dtype} if case.layer == "dynamic" else {}),
            "pass": "forward+backward" if case.backward else "forward",
            "median_us": t.median_us, "p20_us": t.p20_us, "p80_us": t.p80_us,
            "GBps": gbps, "copy_fraction": gbps / copy_gbps, "samples": len(t.samples_s), "note": note,
        }

    case_settings = [settings or default_settings(case.mode) for case in cases]
    for ci, case in enumerate(cases):
        s = case_settings[ci]
        inp = make_inputs(case, INPUT_SEED)
        for impl in in_process:
            step(f"{case.label}: {impl}")
            runner = make_runner(impl, case, inp)
            add_row(ci, impl, time_runner(runner, case.mode, s.iters, s.warmup, s.repeats), runner.note)
            del runner
        del inp
    for impl in (i for i in impls if i in CHILD_IMPLS):
        step(f"{impl}: every case, in a child process")
        for ci, (t, note) in enumerate(time_in_child(impl, cases, case_settings)):
            add_row(ci, impl, t, f"{note} (timed in a child process)".lstrip())
    for ci in range(len(cases)):
        case_rows = [rows[ci, impl] for impl in impls]
        for c in compare:
            case_rows[0][f"speedup_vs_{c}"] = rows[ci, c]["median_us"] / rows[ci, "kernels"]["median_us"]
        result.rows += case_rows
    result.meta = run_meta(copy_gbps, settings or default_settings(cases[0].mode if cases else "latency"), compare,
                           matmul_gflops)
    return result


def plot_speedup(rows: list[dict], path, title: str = "") -> None:
    """Speedup of the kernels row over each comparison, by C (one line per comparison, n, B,
    dtype and pass). Needs matplotlib (the `plot` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("speedup_vs_"):
                label = (f"vs {k[len('speedup_vs_'):]} (B={r['B']}, n={r['n']}, {r['dtype']}"
                         f"{', fwd+bwd' if r['pass'] != 'forward' else ''})")
                series.setdefault(label, []).append((r["C"], v))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    Cs = sorted({p[0] for pts in series.values() for p in pts})
    if Cs:
        ax.set_xticks(Cs)
        ax.set_xticklabels([str(c) for c in Cs])
        ax.minorticks_off()
    ax.set_xlabel("C (channels per stream)")
    ax.set_ylabel("speedup of kernels (x)")
    ax.set_title(title or "mhc-aot kernels speedup by C")
    if series:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    plt.close(fig)
