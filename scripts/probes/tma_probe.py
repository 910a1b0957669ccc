"""Probe (issue 6, docs/HISTORY.md session 20): TMA copies inside a kernel launched by MLX's
mx.fast.precompiled_cuda_kernel, which passes no CUtensorMap. The host encodes a template tensor map
(libcuda's cuTensorMapEncodeTiled, a placeholder address) and passes its 128 bytes as an input array;
the kernel (scripts/probes/tma_stream.cu, built here for sm_90a) writes x's address into its own copy
and streams x through it. Checks the sum of x against MLX's and times the kernel against MLX's own
row sums (both read x once), queued, median of 5 rounds.

  python scripts/probes/tma_probe.py [--rows 32768 --cols 4096] [BRxBCxNST ...]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
BF16, SWIZZLE_NONE, L2_256B = 9, 0, 3  # CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion


def template(rows: int, cols: int, br: int, bc: int, n3: int = 0) -> np.ndarray:
    """A 2D bfloat16 tensor map of [rows, cols] in boxes of br x bc (n3: a 3D map of [rows, n3, cols]
    in boxes of br x n3 x bc), at a placeholder address."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    buf = (ctypes.c_uint8 * 256)()
    at = (ctypes.addressof(buf) + 63) & ~63  # CUtensorMap is 64-byte aligned
    if n3:
        rc = fn(at, BF16, 3, 1 << 20, (ctypes.c_uint64 * 3)(cols, n3, rows),
                (ctypes.c_uint64 * 2)(cols * 2, n3 * cols * 2), (ctypes.c_uint32 * 3)(bc, n3, br),
                (ctypes.c_uint32 * 3)(1, 1, 1), 0, SWIZZLE_NONE, L2_256B, 0)
    else:
        rc = fn(at, BF16, 2, 1 << 20, (ctypes.c_uint64 * 2)(cols, rows), (ctypes.c_uint64 * 1)(cols * 2),
                (ctypes.c_uint32 * 2)(bc, br), (ctypes.c_uint32 * 2)(1, 1), 0, SWIZZLE_NONE, L2_256B, 0)
    if rc:
        raise RuntimeError(f"cuTensorMapEncodeTiled returned CUresult {rc}")
    return np.frombuffer(bytes((ctypes.c_uint8 * 128).from_address(at)), np.uint8).copy()


def build(br: int, bc: int, nst: int, n3: int = 0) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "k.cubin"
        cmd = ["nvcc", "-O3", "-std=c++17", "-arch=sm_90a", "-cubin", "-Xptxas=-v", f"-DBR={br}", f"-DBC={bc}",
               f"-DNST={nst}", *([f"-DNS3={n3}"] if n3 else []), str(HERE / "tma_stream.cu"), "-o", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"nvcc failed:\n{r.stderr[-3000:]}")
        return out.read_bytes()


def median_us(fn, rounds=5, calls=20) -> float:
    mx.eval(fn())
    meds = []
    for _ in range(rounds):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [fn() for _ in range(calls)]
        mx.eval(outs)
        mx.synchronize()
        meds.append((time.perf_counter() - t0) / calls * 1e6)
    return float(np.median(meds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=["32x64x4", "32x128x4", "32x128x5", "16x128x8", "8x256x8"])
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--ctas", type=int, default=132 * 4)  # 128 threads each
    ap.add_argument("--streams", type=int, default=0, help="n > 0: x is [rows / n, n, cols], 3D boxes of all n")
    args = ap.parse_args()
    rows, cols, G, n3 = args.rows, args.cols, args.ctas, args.streams
    x = mx.random.normal((rows, cols)).astype(mx.bfloat16)
    if n3:  # [T, n, C] as the dynamic layer's x: boxes of BR tokens x n streams x BC columns
        x, rows = x.reshape(rows // n3, n3, cols), rows // n3
    want = mx.sum(x.astype(mx.float32))
    mx.eval(x, want)
    gb = x.size * 2 / 1e9
    t_mlx = median_us(lambda: mx.sum(x, axis=-1))
    print(f"PROBE mlx bf16 row sums {tuple(x.shape)} bf16: {t_mlx:.1f} us, {gb / t_mlx * 1e6:.0f} GB/s", flush=True)
    for cfg in args.configs:
        br, bc, nst = (int(v) for v in cfg.split("x"))
        cubin, tmpl = build(br, bc, nst, n3), mx.array(template(rows, cols, br, bc, n3))

        def call():
            return mx.fast.precompiled_cuda_kernel(
                name="tma_stream", compiled_source=cubin, inputs=[x, tmpl], output_shapes=[(G * 128,), (G * 128,)],
                output_dtypes=[mx.float32, mx.uint8], scalars=[rows, cols], grid=(G * 128, 1, 1),
                threadgroup=(128, 1, 1), shared_memory=0, init_value=0.0, ensure_row_contiguous=True)[0]

        got = mx.sum(call())
        err = float(mx.abs(got - want) / mx.sum(mx.abs(x.astype(mx.float32))))
        t = median_us(call)
        print(f"PROBE tma {br}x{f'{n3}x' if n3 else ''}{bc} boxes, {nst} stages, {G} CTAs: sum's error / sum |x| {err:.1e}, {t:.1f} us, "
              f"{gb / t * 1e6:.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
