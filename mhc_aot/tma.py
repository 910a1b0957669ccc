"""Tensor-map templates for the kernels that copy with TMA (cuda_src/mhc_tma.cuh).

MLX's mx.fast.precompiled_cuda_kernel passes arrays and scalars only, and an array's address is known
only when the graph runs. So the host encodes a map at a placeholder address with libcuda's
cuTensorMapEncodeTiled and passes its 128 bytes as a uint32 [32] input; each CTA writes the real
address into its copy on the device (tensormap.replace). Encoded once per shape (cached).

`encode` is the one function the tests replace: the CPU emulation (tests/cuda_emulation.py) has no
libcuda and reads its own template layout.
"""

from __future__ import annotations

import ctypes
import functools

import mlx.core as mx
import numpy as np

# CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion (cuda.h)
DTYPE = {"bf16": 9, "f16": 6, "f32": 7}
SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}  # bytes -> enum
L2_PROMOTION_256B = 3
PLACEHOLDER = 1 << 20  # 16-byte aligned; replaced on the device


def _encode_libcuda(dtype: str, dims: tuple, strides: tuple, box: tuple, swizzle: int) -> bytes:
    """cuTensorMapEncodeTiled's 128 bytes: dims innermost first (elements), strides of dims 1.. (bytes),
    box (elements), swizzle (bytes: 0 or 32 / 64 / 128)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"TMA kernels need the CUDA driver library (libcuda.so.1) to encode tensor maps: {e}. "
                           "Install the NVIDIA driver, or pass backend='portable'") from e
    fn = lib.cuTensorMapEncodeTiled
    u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    rank = len(dims)
    buf = (ctypes.c_uint8 * 192)()
    at = (ctypes.addressof(buf) + 63) & ~63  # a CUtensorMap is 64-byte aligned
    rc = fn(at, DTYPE[dtype], rank, PLACEHOLDER, (ctypes.c_uint64 * rank)(*dims),
            (ctypes.c_uint64 * (rank - 1))(*strides), (ctypes.c_uint32 * rank)(*box),
            (ctypes.c_uint32 * rank)(*[1] * rank), 0, SWIZZLE[swizzle], L2_PROMOTION_256B, 0)
    if rc:
        raise RuntimeError(f"cuTensorMapEncodeTiled returned CUresult {rc} for dims {dims}, byte strides {strides}, "
                           f"box {box}, {swizzle}-byte swizzle: a shape outside what TMA takes (strides must be "
                           f"multiples of 16 bytes); pass backend='portable'")
    return bytes((ctypes.c_uint8 * 128).from_address(at))


encode = _encode_libcuda


@functools.lru_cache(maxsize=64)
def _template(dtype: str, dims: tuple, strides: tuple, box: tuple, swizzle: int, encoder) -> np.ndarray:
    return np.frombuffer(encoder(dtype, dims, strides, box, swizzle), np.uint32).copy()


# CACHE_ARRAYS = 0: a new array every launch (an A/B's control: scripts/gpu_dynamic_ab.py's tma.CACHE_ARRAYS=0)
CACHE_ARRAYS = 1


def template(dtype: str, dims: tuple, strides: tuple, box: tuple, swizzle: int) -> mx.array:
    """The uint32 [32] template of a tiled map (mhc_tma.cuh's publish_map writes its address): one array
    per map for the process. An array made from host data lives in CUDA managed memory in MLX 0.32.4
    (its allocator takes unified memory for an allocation without a stream), written by the CPU, so a new
    one every launch page-faulted on each launch's first reads before any CTA could start its copies
    (session 41, H100: 68 us from entry to the one-read kernel's first tile, 15.9 reused). The ops never
    paid it (their mx.compile'd graphs keep the array they traced); a direct launch did (the trace tool,
    tests, kernel_ops.COMPILE_FORWARD = False). Reused, its page moves to the GPU once and stays."""
    args = (dtype, tuple(dims), tuple(strides), tuple(box), swizzle, encode)
    return _template_array(*args) if CACHE_ARRAYS else mx.array(_template(*args))


@functools.lru_cache(maxsize=64)
def _template_array(dtype: str, dims: tuple, strides: tuple, box: tuple, swizzle: int, encoder) -> mx.array:
    return mx.array(_template(dtype, dims, strides, box, swizzle, encoder))
