"""Same-run A/B of the dynamic layer's coefficients + x_in on the GPU: the three-kernel path
(projection, coefficients, pre) against mhc_dynamic_coeffs_pre (x read from DRAM once, one
persistent launch) as built and, optionally, as source variants compiled here with -D defines (as
scripts/gpu_source_ab.py). DynamicMHC around an identity F as `mhc bench --layer dynamic` times it
(queued throughput mode), the order alternating over rounds: run-to-run spread on the device is
larger than many differences worth measuring, so all run inside one process.

  python scripts/gpu_dynamic_ab.py                                   # three-kernel path vs one-read
  python scripts/gpu_dynamic_ab.py lag3=:MHC_CP_LAG=3 lag9=:MHC_CP_LAG=9
  python scripts/gpu_dynamic_ab.py --backward
  python scripts/gpu_dynamic_ab.py --source mhc_dynamic_proj_tc --phi-dtype bfloat16 terms3=@BF16_PHI_TERMS=3
                                   # a bfloat16 phi: the projection's one term (shipped) vs three
  python scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 one-read-t3=@CP_MIN_T=1024,BF16_PHI_TERMS=3
                                   # the same in the one-read kernel (a knob path runs the three
                                   kernels unless it sets CP_MIN_T)
  python scripts/gpu_dynamic_ab.py --source mhc_dynamic_post_res old=/tmp/old_post_res.cu   # the three-kernel
                                   path with a variant of one of its kernels (NMAX 4 and 0 builds)
  python scripts/gpu_dynamic_ab.py --source mhc_dynamic_coeffs regs=@ELEMS_MAX_N=0   # a rule's knob
  python scripts/gpu_dynamic_ab.py --source mhc_dynamic_proj_tc ns5=:MHC_TC_NS=5@TC_SMEM_BYTES=110592
                                   # a DEFINE and the launch constant it changes
  python scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 --layers 8 --configs 8192:4:4096
                                   # a stack of 8 layers a call, each with its own parameters and scratch
                                   (what a model's L2 sees between launches: session 52's mailbox hint
                                   leaves lines at evict_last after each launch); times are a call's
  python scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 fresh=@CP_MIN_T=1024,tma.CACHE_ARRAYS=0
  python scripts/gpu_dynamic_ab.py --phi-dtype bfloat16 both=:MHC_PHI_TERMS=1:MHC_CP_XU=2+mhc_dynamic_post_res:MHC_PR_REVERSE=0
                                   # two kernels' variants together (after +: another source and its defines)
                                   # a knob of a module cuda_dynamic imports (dotted)

Prints one line per (config, path): the sorted medians of the rounds (us), after a `check` line of the
path's largest output difference from the first path's, also as a fraction of that path's largest |value|
(the three kernels: a bfloat16 output's rounding differs between paths, so expect ~1e-2 where x is O(1),
not 0; with --layers the values grow layer by layer, so read the fraction).

--gpu-time N: after each wall-clock timing, N more calls queued under CUPTI (scripts/gpu_cupti.py; PyTorch then
sits in this process): a `GPU` line per path gives the GPU time a call (first kernel's start to last kernel's
end, over N, so MLX's gaps between calls count) sorted over the rounds, and each kernel's median duration
(the median of the rounds'): the figure that moves by well under a µs between processes, where the
wall-clock medians move by ~10.

Variants are built as the wheel's binaries are (scripts/gpu_source_ab.compile_variant says why: until
session 31 raw cubins timed slower than the shipped fatbins of the same source where the host sets the
pace). A control compiled here from the tree's source (`ctl=:`) still guards against anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mhc_aot import bench, cuda, cuda_dynamic, kernel_ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_cupti  # noqa: E402  (--gpu-time)
import gpu_source_ab  # noqa: E402  (compile_variant, use)

SOURCE = "mhc_dynamic_coeffs_pre"
CONFIGS = [(8192, 4, 4096), (4096, 4, 2048), (16384, 4, 2048), (2048, 4, 4096), (1024, 4, 4096), (8192, 2, 4096),
           (8192, 4, 1024)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", help="LABEL=[PATH][:DEFINE...][@KNOB=VALUE,...]")
    ap.add_argument("--source", default=SOURCE, help=f"the kernel the variants replace (default {SOURCE})")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=None, help="T:n:C,... (default: the seven above)")
    ap.add_argument("--phi-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the layer's phi (bfloat16: Liger's benchmark, and the projection's one-term variant)")
    ap.add_argument("--layers", type=int, default=1,
                    help="layers a call (each its own DynamicMHC, identity F, x through all of them)")
    ap.add_argument("--gpu-time", type=int, default=0, metavar="N",
                    help="also N calls a round under CUPTI: GPU time a call and kernel durations (device only)")
    args = ap.parse_args()
    if args.gpu_time:
        gpu_cupti.require()
    shipped = cuda._binary
    # (label, CP_MIN_T, binaries): the three kernels, the one-read kernel as built, the variants
    one_read = args.source == SOURCE
    paths = [("three", None, None)] + ([("one-read", 1024, None)] if one_read else [])
    # LABEL=[PATH][:DEFINE...][@NAME=VALUE,...]: the variant's binaries (the shipped ones without PATH or
    # DEFINE) with attributes of mhc_aot.cuda_dynamic set (a rule's knob, or a launch constant such as
    # TC_SMEM_BYTES that a DEFINE changes)
    # ...[+SOURCE:DEFINE...]: another kernel's source compiled with those defines in the same variant
    specs = {v.partition("=")[0]: v.partition("=")[2].split("+")[0].partition("@") for v in args.variants}
    extras = {v.partition("=")[0]: [e.partition(":") for e in v.partition("=")[2].split("+")[1:]] for v in args.variants}
    knobs = {label: dict(kv.split("=") for kv in spec[2].split(",")) if spec[2] else {}
             for label, spec in specs.items()}

    def nmaxes(source):
        return (4,) if source == SOURCE else (4, 0)

    for label, (src, _, _) in specs.items():
        bins = gpu_source_ab.compile_variant(args.source, f"{label}={src}", nmaxes(args.source))[1] if src else None
        table = {args.source: bins} if bins is not None else {}
        for other, _, defs in extras[label]:
            table[other] = gpu_source_ab.compile_variant(other, f"{label}=:{defs}", nmaxes(other))[1]
        paths.append((label, 1024 if one_read and bins is not None else None, table or None))
    def owner(name: str):  # (object, attribute) of a knob: cuda_dynamic's, or a dotted one (tma.CACHE_ARRAYS)
        *path, attr = name.split(".")
        obj = cuda_dynamic
        for p in path:
            obj = getattr(obj, p)
        return obj, attr

    defaults = {k: getattr(*owner(k)) for kv in knobs.values() for k in kv}
    configs = ([tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")] if args.configs
               else CONFIGS)
    ref: dict[tuple, list] = {}
    for T, n, C in configs:
        res: dict[str, list[float]] = {label: [] for label, _, _ in paths}
        gpu: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in paths}
        for rnd in range(args.rounds):
            for label, min_t, bins in (paths if rnd % 2 == 0 else paths[::-1]):
                for k, v in defaults.items():
                    setattr(*owner(k), v)
                cuda_dynamic.CP_MIN_T, cuda_dynamic.CP_SHAPES = min_t, False  # the one-read kernel at any shape
                for k, v in knobs.get(label, {}).items():  # a knob's type from its default (CP_MIN_T: int)
                    setattr(*owner(k), int(v) if defaults[k] is None else type(defaults[k])(v))
                use_all(bins or {}, shipped)
                # the path is chosen when a graph is traced: no cached trace of another one replays
                kernel_ops._compiled.cache_clear()
                cuda_dynamic._coeffs_fn.cache_clear()
                case = bench.Case("throughput", T, n, C, "bfloat16", args.backward, layer="dynamic",
                                  phi_dtype=args.phi_dtype)
                runner = bench.make_runner("kernels", case, bench.make_inputs(case), layers=args.layers)
                if rnd == 0:  # each path's outputs against the first path's (a variant that is wrong shows)
                    out = [v.astype(mx.float32) for _, v in tree_flatten(runner.call())]
                    want = ref.setdefault((T, n, C), out)
                    err = max(mx.max(mx.abs(a - b)).item() for a, b in zip(out, want))
                    # relative to the outputs' size too: a stack of identity-F layers grows x (~1e5 at 8)
                    scale = max(mx.max(mx.abs(b)).item() for b in want)
                    print(f"check {T},{n},{C} {label:8s} max |out - {paths[0][0]}'s| = {err:.3g}"
                          f" ({err / scale if scale else 0.0:.3g} of its largest |value|)", flush=True)
                res[label].append(bench.time_runner(runner, "throughput", 30, 5, repeats=5).median_us)
                if args.gpu_time:
                    events, _ = gpu_cupti.profile_batch(runner, args.gpu_time, gpu_cupti.trace_path(f"ab_{label}"))
                    gpu[label].append(gpu_cupti.summary(events, args.gpu_time))
        for label, medians in res.items():
            print(f"AB dynamic {'fwd+bwd' if args.backward else 'fwd'} {T},{n},{C}"
                  f"{f' x{args.layers} layers' if args.layers > 1 else ''} {label:8s} "
                  f"{' '.join(f'{m:7.1f}' for m in sorted(medians))}", flush=True)
        for label, rounds in gpu.items():
            if rounds:
                spans, durs = gpu_cupti.over_rounds(rounds)
                print(f"GPU dynamic {'fwd+bwd' if args.backward else 'fwd'} {T},{n},{C} {label:8s} a call "
                      f"{' '.join(f'{v:7.1f}' for v in spans)}; kernel medians: {durs}", flush=True)
    gpu_source_ab.use(args.source, None, shipped)


def use_all(table: dict, shipped) -> None:
    """cuda._binary serving {source: binaries} (gpu_source_ab.compile_variant's) and the shipped rest."""
    def _binary(src, dtype, n, units=1, terms=3):
        name, binary, nmax = shipped(src, dtype, n, units, terms)
        return (*table[src][nmax], nmax) if src in table else (name, binary, nmax)

    cuda._binary = _binary if table else shipped


if __name__ == "__main__":
    main()
