"""Metal backend: the precompiled kernels of metal_src/ (one mhc_aot.metallib, built by
build_tools/metal.py on macOS) launched through `mx.fast.metal_kernel`, so every launch is an
MLX primitive on MLX's own command queue, lazy and traced by `mx.compile`. Nothing is compiled
at run time: before a kernel's first launch the shim (mhc_aot._shim.metal_preload) puts the
metallib into MLX's Metal library cache under the key that primitive looks up, and checks the
function and its buffer arguments there. Gradients come from `mx.custom_function` VJPs that
launch the backward kernels, as in mhc_aot/cuda.py, whose launch geometry this module mirrors.

The mapping onto MLX's Metal primitive (see metal_src/mhc_common.h):
  - buffers bind in call order: the CUDA kernel's inputs, then one int32 input `scalars` (the
    CUDA scalar tail, floats bit-cast, padded to SCALAR_SLOTS), then the outputs;
  - MLX passes arrays of fewer than 8 elements in the constant space under another kernel name,
    so every input is padded to at least 8 elements (the kernels read only their n values);
  - the function name and library key come from one place, mhc_aot._shim.metal_kernel_key;
  - the body handed to metal_kernel is a `#error`: if MLX ever looks under another key, its JIT
    fails loudly with that message instead of running something else.

NOT RUN ON APPLE HARDWARE: written for MLX 0.32.4's Metal primitive and checked on Linux only:
a syntax-and-type check of the sources, the kernels and this module run under a CPU emulation of
the Metal subset they use (tests/test_metal_sources.py), the key against MLX's own generated
source (tests/test_shim.py), the shim's preload code compiled against MLX 0.32.4's macOS headers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import tempfile

import mlx.core as mx

from . import device, dispatch, kernel_ops, manifest, testing
from .kernel_ops import dtype_tag

THREADS = 256  # metal_src/mhc_common.h
TILE_C = 1024  # metal_src/mhc_column_common.h
DM_CHUNK = 32  # metal_src/mhc_backward_dm.metal
IB = 8  # rows per register tile for n > 8 (metal_src/mhc_common.h)
SINKHORN_TG_FLOATS = 64 * 64  # metal_src/mhc_sinkhorn_fwd.metal: the matrix in threadgroup memory up to this
# n <= SMALL_N: one simdgroup per row, the matrix in registers (metal_src/mhc_sinkhorn_common.h)
SMALL_N = 32
SMALL_THREADS = 32 * SMALL_N
TILE = SMALL_N * (SMALL_N + 1)
GENERIC_N_LIMIT = 256  # metal_src/mhc_common.h: streams the generic (NMAX 0) kernels serve
DM_N_LIMIT = 64  # metal_src/mhc_backward_dm.metal: larger n take MLX's own VJP
BACKWARD_GROUPS = 128  # threadgroups of the backward (Metal exposes no core count to MLX); only splits work
SCALAR_SLOTS = 8  # MLX's max_constant_array_size: smaller inputs would be renamed and bound as constant
METALLIB = "mhc_aot.metallib"
F32 = mx.float32

MLX_TYPE = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.int32: "int32_t"}

STUB_BODY = ("\n#error \"mhc-aot: precompiled kernel {name} was not found in MLX's Metal library cache, so MLX "
             "tried to compile this placeholder. The cache key mhc_aot._shim.metal_kernel_key computed no longer "
             "matches this MLX ({mlx}): reinstall mhc-aot built against it, or pass backend='portable'.\"\n")


class MetalPreloadError(RuntimeError):
    """The precompiled Metal library could not be put where MLX looks for it; the message says why."""


def _shim():
    try:
        return device.load_shim()
    except ImportError as e:
        raise MetalPreloadError(f"mhc_aot._shim is not importable ({e}): {manifest.REINSTALL_HINT}") from e


@functools.lru_cache(maxsize=1)
def _check_shim() -> None:
    facts = _shim().build_info()["metal"]
    if not facts.get("preload"):
        raise MetalPreloadError(f"no Metal kernel preload in this build of mhc_aot._shim: {facts.get('reason')}; "
                                f"{manifest.REINSTALL_HINT}")
    if facts.get("mlx_headers") != mx.__version__:
        raise MetalPreloadError(f"mhc_aot._shim was built against MLX {facts.get('mlx_headers')} but MLX "
                                f"{mx.__version__} is running: its library cache may differ; {manifest.REINSTALL_HINT}")


def stub_body(name: str) -> str:
    return STUB_BODY.format(name=name, mlx=mx.__version__)


def kernel_key(row: dict) -> dict:
    """What mx.fast.metal_kernel calls this variant's kernel and where it looks for its library:
    {kernel_name, source, library_name, ...} from the shim's one key function."""
    abi = row["abi"]
    inputs = [(n, t, SCALAR_SLOTS, 1) for n, t in abi["inputs"]]
    return dict(_shim().metal_kernel_key(row["name"], inputs, [tuple(o) for o in abi["outputs"]], stub_body(row["name"])))


@contextlib.contextmanager
def _capture_stdout():
    """Collect what native code writes to file descriptor 1 (MLX prints generated sources there)."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(1)
        try:
            os.dup2(tmp.fileno(), 1)
            yield out
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode())


def mlx_generated_source(row: dict) -> str:
    """The source MLX itself generates for this variant's metal_kernel call (verbose=True), read
    back from its printout. On a machine without Metal it is taken under export tracing."""
    abi = row["abi"]
    kernel = mx.fast.metal_kernel(name=row["name"], input_names=[n for n, _ in abi["inputs"]],
                                  output_names=[n for n, _ in abi["outputs"]], source=stub_body(row["name"]))
    by_type = {v: k for k, v in MLX_TYPE.items()}
    args = [mx.zeros((SCALAR_SLOTS,), by_type[t]) for _, t in abi["inputs"]]

    def call(*inputs):
        return kernel(inputs=list(inputs), output_shapes=[(1,)] * len(abi["outputs"]),
                      output_dtypes=[by_type[t] for _, t in abi["outputs"]], grid=(THREADS, 1, 1),
                      threadgroup=(THREADS, 1, 1), verbose=True)

    with _capture_stdout() as printed:
        if mx.metal.is_available():
            call(*args)
        else:
            with tempfile.TemporaryDirectory() as d:
                mx.export_function(os.path.join(d, "k.mlxfn"), call, *args)
    text = printed[0]
    start = text.index("```\n") + 4
    return text[start:text.rindex("\n```")]


class _Kernel:
    """One variant, preloaded: its metal_kernel object and ABI."""

    def __init__(self, variant: manifest.Variant):
        row = variant.row
        self.name, self.nmax, self.abi = row["name"], row["nmax"], row["abi"]
        key = kernel_key(row)
        if key["kernel_name"] != self.abi["function"]:
            raise MetalPreloadError(f"{self.name}: MLX would look for a function named {key['kernel_name']}, the "
                                    f"metallib has {self.abi['function']}: {manifest.REINSTALL_HINT}")
        generated = mlx_generated_source(row)
        if generated != key["source"]:
            raise MetalPreloadError(f"{self.name}: MLX {mx.__version__} generates another kernel source than "
                                    f"mhc_aot._shim.metal_kernel_key assumes, so its library key differs: "
                                    f"{manifest.REINSTALL_HINT}")
        path = variant.path("metallib")
        variant.read("metallib", verify=True)
        loaded = _shim().metal_preload(str(path), key["library_name"], key["kernel_name"],
                                       [n for n, _ in self.abi["inputs"] + self.abi["outputs"]], THREADS)
        self.library_name = key["library_name"]
        # threads per threadgroup this pipeline allows: the Sinkhorn kernels' 1024-thread path
        # (abi["threads"]) is used only where it does; their THREADS path serves every n otherwise
        self.max_threads = min(int(loaded["max_threads_per_threadgroup"]), self.abi["threads"])
        self.kernel = mx.fast.metal_kernel(name=self.name, input_names=[n for n, _ in self.abi["inputs"]],
                                           output_names=[n for n, _ in self.abi["outputs"]],
                                           source=stub_body(self.name))


@functools.lru_cache(maxsize=None)
def _kernel(source: str, dtype: str | None, n: int | None) -> _Kernel:
    _check_shim()
    return _Kernel(manifest.find("metal", source, dtype, n))


def _bits(v) -> int:
    """A scalar as the int32 the kernel's `struct Scalars` reads (floats bit-cast as float32)."""
    if isinstance(v, float):
        return struct.unpack("<i", struct.pack("<f", v))[0]
    return int(v)


@functools.lru_cache(maxsize=4096)
def _scalars(values: tuple) -> mx.array:
    slots = [_bits(v) for v in values]
    return mx.array(slots + [0] * max(0, SCALAR_SLOTS - len(slots)), dtype=mx.int32)


def _at_least_8(a: mx.array) -> mx.array:
    """Inputs of fewer than 8 elements, padded with zeros (see the module docstring)."""
    if a.size >= SCALAR_SLOTS:
        return a
    return mx.concatenate([a.reshape(-1), mx.zeros((SCALAR_SLOTS - a.size,), a.dtype)])


def _launch(source: str, dtype: str | None, n: int | None, inputs, output_shapes, output_dtypes, scalars, grid,
            threads: int = THREADS):
    k = _kernel(source, dtype, n)
    args = [_at_least_8(a) for a in inputs] + [_scalars(tuple(scalars))]
    expected = [t for _, t in k.abi["inputs"]]
    got = [MLX_TYPE.get(a.dtype, str(a.dtype)) for a in args]
    if got != expected:
        raise ValueError(f"{k.name} takes inputs of types {expected}, got {got}")
    return k.kernel(inputs=args, output_shapes=output_shapes, output_dtypes=output_dtypes, grid=grid,
                    threadgroup=(threads, 1, 1), init_value=float("nan") if testing.poison_requested() else None)


def _check_n(n: int, what: str) -> None:
    if n > GENERIC_N_LIMIT:
        raise ValueError(f"{what} with n={n} streams: the Metal kernels serve n <= {GENERIC_N_LIMIT} (their per-stream "
                         f"values live in 32 KB of threadgroup memory); pass backend='portable'")


# ---------------------------------------------------------------- sinkhorn
def _small(source: str, n: int) -> bool:
    """n <= SMALL_N runs one simdgroup per row with SMALL_THREADS threads, if the pipeline allows them."""
    return n <= SMALL_N and _kernel(source, None, None).max_threads >= SMALL_THREADS


def _sinkhorn_fwd(L: mx.array, iters: int, eps: float) -> mx.array:
    n = L.shape[0]
    threads = SMALL_THREADS if _small("mhc_sinkhorn_fwd", n) else THREADS
    use_smem = int(threads == SMALL_THREADS or n * n <= SINKHORN_TG_FLOATS)
    (M,) = _launch("mhc_sinkhorn_fwd", None, None, [L], [(n, n)], [F32], [n, iters, eps, use_smem], (threads, 1, 1),
                   threads)
    return M


def _sinkhorn_bwd(L: mx.array, dM: mx.array, iters: int, eps: float) -> mx.array:
    n = L.shape[0]
    if _small("mhc_sinkhorn_bwd", n):  # registers + the history in ws (static threadgroup memory cannot hold it)
        threads, ws, use_smem = SMALL_THREADS, iters * TILE + 2 * iters * SMALL_N, 1
    else:
        threads, ws, use_smem = THREADS, n * n * (iters + 2) + 2 * n * iters, 0
    dL, _ = _launch("mhc_sinkhorn_bwd", None, None, [L, dM.astype(F32)], [(n, n), (max(ws, 1),)], [F32, F32],
                    [n, iters, eps, use_smem], (threads, 1, 1), threads)
    return dL


# ---------------------------------------------------------------- static forward / backward
def _forward_fused(x, M, hpre_raw, hpost_raw, w, eps):
    B, n, C = x.shape
    return _launch("mhc_forward_fused", dtype_tag(x.dtype), n, [x, M, hpre_raw, hpost_raw, w], [(B, n, C), (B,)],
                   [x.dtype, F32], [n, C, eps], (B * THREADS, 1, 1))


def _forward_column(x, M, hpre_raw, hpost_raw, w, eps):
    B, n, C = x.shape
    ntiles = -(-C // TILE_C)
    (partial,) = _launch("mhc_forward_column_rms", dtype_tag(x.dtype), None, [x, hpre_raw], [(B, ntiles)], [F32],
                         [n, C], (ntiles * THREADS, B, 1))
    return _launch("mhc_forward_column", dtype_tag(x.dtype), None, [x, M, hpre_raw, hpost_raw, w, partial],
                   [(B, n, C), (B,)], [x.dtype, F32], [n, C, eps], (ntiles * THREADS, B, 1))


def _backward(x, M, hpre_raw, hpost_raw, w, inv_rms, dout):
    B, n, C = x.shape
    tag = dtype_tag(x.dtype)
    nmax = _kernel("mhc_backward_fused", tag, n).nmax
    G = min(B, BACKWARD_GROUPS)
    P = n * n + 2 * n + C
    dx, partial = _launch("mhc_backward_fused", tag, n, [x, dout, M, hpre_raw, hpost_raw, w, inv_rms],
                          [(B, n, C), (G, P)], [x.dtype, F32], [n, C, B], (G * THREADS, 1, 1))
    if nmax in (2, 4):  # dM accumulated in registers by the fused kernel (n <= 4)
        partial_dm, G_dm = mx.zeros((1,), F32), 0
    else:
        G_dm = min(B * -(-C // DM_CHUNK), BACKWARD_GROUPS)
        (partial_dm,) = _launch("mhc_backward_dm", tag, None, [x, dout], [(G_dm, n * n)], [F32], [n, C, B],
                                (G_dm * THREADS, 1, 1))
    dM, dpre, dpost, dw = _launch("mhc_backward_reduce", None, None, [partial, partial_dm, hpre_raw, hpost_raw],
                                  [(n, n), (n,), (n,), (C,)], [F32] * 4, [G, G_dm, n, C], (P, 1, 1))
    return dx, dM, dpre, dpost, dw


def _backward_in_mlx(n: int, C: int) -> bool:
    """Documented rules (dispatch.BACKWARD_MAX_C; n > DM_N_LIMIT, whose dM tiles exceed 32 KB of
    threadgroup memory): such tokens take MLX's own VJP of the portable graph."""
    return dispatch.choose_backward(n, C, "metal").strategy == "portable" or n > DM_N_LIMIT


def _portable_graph(*args):
    from .ops import _forward_graph_from_M

    return _forward_graph_from_M(*args)


# ---------------------------------------------------------------- stream_mix_add
def _mix_add(x, M, bias):
    B, n, C = x.shape
    ntiles = -(-C // TILE_C)
    (out,) = _launch("mhc_stream_mix_add", dtype_tag(x.dtype), n, [x, M, bias], [(B, n, C)], [x.dtype], [n, C],
                     (ntiles * THREADS, B, 1))
    return out


def _mix_add_dM(x, dout):
    return mx.einsum("bic,bjc->ij", dout.astype(F32), x.astype(F32))


_ops = kernel_ops.build(kernel_ops.Launchers(
    sinkhorn_fwd=_sinkhorn_fwd, sinkhorn_bwd=_sinkhorn_bwd,
    forward={"fused": _forward_fused, "column": _forward_column}, backward=_backward,
    backward_in_mlx=_backward_in_mlx, mlx_graph=_portable_graph,
    mix_add=_mix_add, mix_add_dM=_mix_add_dM, check_n=_check_n))
sinkhorn, mhc_forward, stream_mix_add, _forward_fn = _ops.sinkhorn, _ops.mhc_forward, _ops.stream_mix_add, _ops.forward_fn
