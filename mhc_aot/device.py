"""Facts about the GPU that the launchers and the dispatcher size work by.

The SM count sizes the backward's grid (two CTAs per SM). It comes from the shim's CUDA driver
query when that is available; otherwise DEFAULT_SM_COUNT (the H100 SXM's 132) is used, which
only changes how work is split, never the result.
"""

from __future__ import annotations

import contextlib
import functools
import os

DEFAULT_SM_COUNT = 132


def load_shim():
    """mhc_aot._shim, the compiled extension; ImportError saying why where it is not there. Python run
    from the repo root after a non-editable install imports the source tree, whose `_shim/` folder
    (the C++ sources) would import as an empty namespace package: that is refused by name."""
    from . import _shim

    if getattr(_shim, "__file__", None) is None:
        where = next(iter(getattr(_shim, "__path__", [])), "?")
        raise ImportError(f"mhc_aot was imported from a source tree without its build outputs ({where} holds "
                          "the shim's sources, not the compiled shim): run Python outside the repository's root "
                          "so the installed mhc_aot is imported, or build in place with `pip install -e .`")
    return _shim


TF32_ENV = "MLX_ENABLE_TF32"


def mlx_tf32() -> bool:
    """Whether MLX computes float32 matmuls in TF32 on CUDA: its default, off with MLX_ENABLE_TF32=0
    (an integer MLX reads once per process, at its first such matmul). The kernels use no MLX matmul;
    the portable path and the dynamic layer's documented exits (a Sinkhorn history over shared memory)
    do, so their float32 results are TF32-accurate (~1e-4) unless it is off."""
    try:
        return int(os.environ.get(TF32_ENV, "1")) != 0
    except ValueError:
        return True


@functools.lru_cache(maxsize=1)
def cuda_facts() -> dict:
    """The shim's CUDA device facts, or {'available': False, 'reason': ...}."""
    try:
        _shim = load_shim()
    except ImportError as e:  # installed without its native shim, or a source tree without build outputs
        return {"available": False, "reason": f"mhc_aot._shim not importable: {e}"}
    if not hasattr(_shim, "cuda_device_facts"):
        return {"available": False, "reason": "this build of the shim has no CUDA driver query"}
    return dict(_shim.cuda_device_facts())


@functools.lru_cache(maxsize=1)
def sm_count() -> int:
    facts = cuda_facts()
    return int(facts.get("sm_count") or DEFAULT_SM_COUNT) if facts.get("available") else DEFAULT_SM_COUNT


# Opt-in shared memory per CTA by compute capability (CUDA programming guide, table of
# technical specifications), used when the driver query is unavailable.
_SMEM_BY_ARCH = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                 120: 99 * 1024}


def smem_per_block_of(sm: int) -> int:
    """Opt-in shared memory per CTA of compute capability `sm` (90 = sm_90) by the table; 0 if unknown."""
    return _SMEM_BY_ARCH.get(sm, 0)


# Shared memory per SM by compute capability (same table), and what the hardware reserves per CTA.
_SMEM_PER_SM_BY_ARCH = {80: 164 * 1024, 86: 100 * 1024, 87: 164 * 1024, 89: 100 * 1024, 90: 228 * 1024}
SMEM_RESERVED_PER_CTA = 1024


@functools.lru_cache(maxsize=None)
def resident_ctas_per_sm(shared_bytes: int) -> int:
    """How many CTAs of `shared_bytes` dynamic shared memory fit one SM by shared memory alone (the
    launcher sizes grids to one full wave with it; registers are the kernel's to keep within)."""
    facts = cuda_facts()
    per_sm = int(facts.get("max_shared_memory_per_sm") or 0) if facts.get("available") else 0
    if not per_sm:
        per_sm = _SMEM_PER_SM_BY_ARCH.get(_mlx_arch(), 100 * 1024)
    return max(1, per_sm // (shared_bytes + SMEM_RESERVED_PER_CTA))


def mlx_arch_number() -> int:
    """The digits of MLX's device architecture as a number (sm_90 -> 90); 0 when it has none."""
    import mlx.core as mx

    digits = "".join(ch for ch in str(mx.device_info().get("architecture", "")) if ch.isdigit())
    return int(digits) if digits else 0


def _mlx_arch() -> int:
    """MLX's device architecture as a number (sm_90 -> 90; 90 when MLX names none)."""
    return mlx_arch_number() or 90


@functools.lru_cache(maxsize=1)
def max_shared_memory_per_block() -> int:
    facts = cuda_facts()
    if facts.get("available") and facts.get("max_shared_memory_per_block_optin"):
        return int(facts["max_shared_memory_per_block_optin"])
    return _SMEM_BY_ARCH.get(_mlx_arch(), 99 * 1024)


@functools.lru_cache(maxsize=1)
def _nvtx():
    try:
        _shim = load_shim()
    except ImportError:
        return None
    return _shim if getattr(_shim, "nvtx_available", lambda: {})().get("available") else None


@contextlib.contextmanager
def nvtx_range(name: str):
    """A named NVTX range around the block (the shim's, for Nsight tools); nothing when the shim
    was built without NVTX (`mhc info` says so). An annotation only: it never changes a result."""
    shim = _nvtx()
    if shim is None:
        yield
        return
    shim.nvtx_range_push(name)
    try:
        yield
    finally:
        shim.nvtx_range_pop()
