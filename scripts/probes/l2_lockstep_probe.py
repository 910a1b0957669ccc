"""Probe (issue 6, docs/HISTORY.md session 36): can a one-read forward re-read x from L2 for x_in if
the whole grid walks x in lockstep chunks? Builds scripts/probes/l2_lockstep.cu per config, checks its
x_in against MLX's (loose: the stand-in coefficients sum in another order) and times it, queued,
median of 5 rounds, against MLX's own passes over the same bytes in the same run:
  read    mx.sum(x, -1) (reads x once: 268 MB at (8192, 4, 4096))
  pre     compiled (x * h[..., None]).sum(1) in float32 -> bfloat16 (reads x, writes x_in: pre's bytes)
A config is TTxCWxRxMODE[xHINT][@P]: TT tokens x CW columns a unit, R shared-memory slots, MODE 0 (no
x_in), 1 (x_in from an L2 re-read of the previous chunk), 2 (from shared memory, its slot held a phase
longer); HINT 1 (default) keeps x's first read in L2 and evicts the re-read and x_in first; P CTAs
(default --ctas), all resident: one unit each a chunk, so a chunk is P / (C / CW) * TT tokens.
MODE 1 near MODE 0's time says the re-read hits L2; near read + pre says it misses.

  python scripts/probes/l2_lockstep_probe.py [--T 8192 --C 4096] [CONFIG ...]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from tma_probe import median_us  # (scripts/probes/ is the script's own directory on sys.path)

HERE = Path(__file__).resolve().parent
NS = 4
DEFAULT = ["32x256x3x0", "32x256x3x1", "32x256x3x1x0", "32x256x3x2", "16x256x4x1", "16x256x5x1", "32x128x6x1",
           "16x128x6x1@256", "32x128x3x1@256", "16x256x5x2"]


def build(tt: int, cw: int, r: int, mode: int, hint: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "k.cubin"
        cmd = ["nvcc", "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas=-v", f"-DTT={tt}", f"-DCW={cw}",
               f"-DR={r}", f"-DMODE={mode}", f"-DHINT={hint}", str(HERE / "l2_lockstep.cu"), "-o", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"nvcc failed:\n{p.stderr[-3000:]}")
        regs = [ln.strip() for ln in p.stderr.splitlines() if "registers" in ln]
        print(f"BUILD TT={tt} CW={cw} R={r} MODE={mode} HINT={hint}: {regs[-1] if regs else '?'}", flush=True)
        return out.read_bytes()


def parse(cfg: str, ctas: int) -> tuple[int, int, int, int, int, int]:
    body, _, p = cfg.partition("@")
    v = [int(s) for s in body.split("x")]
    if len(v) not in (4, 5):
        raise SystemExit(f"config {cfg!r}: expected TTxCWxRxMODE[xHINT][@P]")
    tt, cw, r, mode = v[:4]
    return tt, cw, r, mode, v[4] if len(v) == 5 else 1, int(p) if p else ctas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=DEFAULT)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--C", type=int, default=4096)
    ap.add_argument("--ctas", type=int, default=128, help="CTAs, all resident (one an SM at ~200 KB of slots)")
    args = ap.parse_args()
    T, C = args.T, args.C
    x = mx.random.normal((T, NS, C)).astype(mx.bfloat16)
    xf = x.astype(mx.float32)
    h = mx.sigmoid(1e-3 * xf.sum(-1) + 1e-6 * (xf * xf).sum((-1, -2))[:, None])
    want = (xf * h[..., None]).sum(1)
    mx.eval(x, h, want)
    mb_read, mb_pre = x.size * 2 / 1e6, (x.size + T * C) * 2 / 1e6
    pre = mx.compile(lambda a, w: (a.astype(mx.float32) * w[..., None]).sum(1).astype(mx.bfloat16))
    t_read = median_us(lambda: mx.sum(x, axis=-1))
    t_pre = median_us(lambda: pre(x, h))
    dev = mx.device_info().get("device_name", "?")
    print(f"PROBE {dev}, x {tuple(x.shape)} bfloat16: MLX read {t_read:.1f} us ({mb_read / t_read:.2f} TB/s), "
          f"MLX pre {t_pre:.1f} us ({mb_pre / t_pre:.2f} TB/s), read + pre {t_read + t_pre:.1f}", flush=True)
    for cfg in args.configs:
        tt, cw, r, mode, hint, P = parse(cfg, args.ctas)
        S = C // cw
        if C % cw or P % S or T % (P // S * tt):
            print(f"PROBE {cfg}: skipped (C % CW, P % (C / CW) or T % chunk tokens is not 0)", flush=True)
            continue
        ch = P // S * tt
        smem = r * tt * NS * cw * 2
        cubin = build(tt, cw, r, mode, hint)

        def call(cubin=cubin, ch=ch, P=P, smem=smem):
            return mx.fast.precompiled_cuda_kernel(
                name="l2_lockstep", compiled_source=cubin, inputs=[x],
                output_shapes=[(T, C), (4 * S * ch * 8,), (T // tt,)],
                output_dtypes=[mx.bfloat16, mx.float32, mx.int32], scalars=[T, C], grid=(P * 256, 1, 1),
                threadgroup=(256, 1, 1), shared_memory=smem, init_value=0.0, ensure_row_contiguous=True)[0]

        got = call().astype(mx.float32)
        err = float(mx.max(mx.abs(got - want)) / mx.max(mx.abs(want))) if mode else float("nan")
        t = median_us(call)
        mb = mb_pre if mode else mb_read
        print(f"PROBE {cfg}: chunk {ch} tokens ({ch * NS * C * 2 / 1e6:.1f} MB), {smem} B slots, {P} CTAs: "
              f"{t:.1f} us ({mb / t:.2f} TB/s of {'pre' if mode else 'read'}'s bytes), x_in error / max {err:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
