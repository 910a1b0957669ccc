"""Repeated launches of mhc_dynamic_coeffs_pre, each output compared bit for bit with the first launch of
the shipped kernel: the kernel sums in a fixed order, so every launch of every correct variant gives the same
bits. A launch that differs is a race; the script names the outputs, tokens and tiles that differ (tile
z = token // TT; the group's tile index i = z // G, group g = z % G). Session 46 (docs/HISTORY.md) found
with it that the kernel's relaxed counter reads were a race: built without the spin's sleep
(MHC_CP_SPIN_NS=0), every launch formed some tiles' x_in from h_pre before it was written; the reads now
acquire, and tests/test_dynamic.py's test_gpu_coeffs_pre_polls_back_to_back runs that build through here.

  python scripts/gpu_coeffs_pre_stress.py [--launches N] [--configs T:n:C,...] [LABEL=[PATH][:DEFINE...] ...]
  python scripts/gpu_coeffs_pre_stress.py --launches 50 spin0=:MHC_PHI_TERMS=1:MHC_CP_SPIN_NS=0

bfloat16 x and phi (the variants need MHC_PHI_TERMS=1); the shipped kernel runs first as `shipped`.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import mlx.core as mx

from mhc_aot import cuda, cuda_dynamic, testing
from mhc_aot.dynamic import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_source_ab  # noqa: E402

NAMES = ["h_pre", "h_post", "h_res", "x_in", "mix", "invr"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", help="LABEL=[PATH][:DEFINE...] (compiled here)")
    ap.add_argument("--launches", type=int, default=20)
    ap.add_argument("--configs", default="8192:4:4096,16384:4:4096,4096:4:2048")
    args = ap.parse_args()
    shipped = cuda._binary
    paths = [("shipped", None)] + [(v.partition("=")[0], gpu_source_ab.compile_variant(
        "mhc_dynamic_coeffs_pre", v, (4,))[1]) for v in args.variants]
    cuda_dynamic.CP_MIN_T, cuda_dynamic.CP_SHAPES = 1, False
    cfg = Config()
    bad_total = 0
    for spec in args.configs.split(","):
        T, n, C = (int(v) for v in spec.split(":"))
        G = cuda_dynamic.coeffs_pre_groups(T, n, C, mx.bfloat16, mx.bfloat16)
        mx.random.seed(T + n + C)
        x = (mx.random.normal((T, n, C)) * 0.5).astype(mx.bfloat16)
        M = n * n + 2 * n
        phi = (mx.random.normal((n * C, M)) * 0.01).astype(mx.bfloat16)
        b = mx.random.normal((M,)) * 0.1
        a = [mx.array([v]) for v in (0.9, 1.1, 0.8)]
        mx.eval(x, phi, b, *a)
        ref = None
        for label, bins in paths:
            gpu_source_ab.use("mhc_dynamic_coeffs_pre", bins, shipped)
            bad = 0
            for k in range(args.launches):
                # odd launches with NaN-poisoned outputs (an unwritten element shows), even ones as shipped
                with testing.poisoned_outputs() if k % 2 else contextlib.nullcontext():
                    outs = cuda_dynamic._coeffs_pre(x, phi, b, *a, cfg, G, phi_terms=1)[:6]
                    mx.eval(outs)
                if ref is None:
                    ref = outs
                    continue
                diff = []
                for name, u, v in zip(NAMES, outs, ref):
                    if mx.array_equal(u, v, equal_nan=True).item():
                        continue
                    u, v = (np.array(o.astype(mx.float32)) for o in (u, v))
                    neq = ~((u == v) | (np.isnan(u) & np.isnan(v)))
                    tok = np.unique(np.nonzero(neq.reshape(T, -1))[0])
                    z = np.unique(tok // cuda_dynamic.CP_TT)
                    # x_in: which CTAs' column ranges (CP_CW columns each) are wrong, and how much of it is NaN
                    where = ""
                    if name == "x_in":
                        splits = np.unique(np.nonzero(neq)[1] // cuda_dynamic.CP_CW)
                        where = (f" in {splits.size} of {-(-C // cuda_dynamic.CP_CW)} column splits (first"
                                 f" {splits[:4].tolist()}), NaN {np.isnan(u[neq]).mean():.2f} of them")
                    diff.append(f"{name}: {tok.size} tokens (first {tok[:4].tolist()}){where}, tiles z {z[:6].tolist()}"
                                f" (i = z // G {sorted(set((z // G).tolist()))[:6]}, g {sorted(set((z % G).tolist()))}),"
                                f" max |diff| {np.abs(u - v)[neq].max():.3g}")  # nan where one side is
                if diff:
                    bad += 1
                    print(f"  {T},{n},{C} {label} launch {k}: " + "; ".join(diff), flush=True)
            print(f"{T},{n},{C} G={G} {label:8s}: {bad} of {args.launches if label != 'shipped' else args.launches - 1}"
                  f" launches differ from the shipped kernel's first", flush=True)
            bad_total += bad
    gpu_source_ab.use("mhc_dynamic_coeffs_pre", None, shipped)
    sys.exit(1 if bad_total else 0)


if __name__ == "__main__":
    main()
