"""Same-run A/B of source variants of one static-layer kernel on the GPU: each variant is compiled
here with nvcc (this GPU's arch, the variant's -D defines) and swapped in for the shipped binary of
that source, then the static forward (with --backward: forward + backward, every gradient) runs
under the dispatch rules as shipped (so the shapes must be ones the rules send to that kernel). For
each shape: the outputs of every variant against the first's (same inputs), then the queued call's
median over rounds, the order alternating.

  python scripts/gpu_source_ab.py mhc_forward_ring shipped= units1=:MHC_RING_UNITS=1
  python scripts/gpu_source_ab.py mhc_forward_ring shipped= old=/tmp/old_ring.cu --shapes 1024,32,2048
  python scripts/gpu_source_ab.py mhc_backward_ring --backward shipped= new=/tmp/new_bring.cu

A variant is LABEL=[PATH][:DEFINE...]; PATH defaults to cuda_src/SOURCE.cu; a DEFINE that starts
with "-" is an nvcc flag (e.g. -lineinfo for Nsight Compute); LABEL= alone is the
installed package's binaries as its launcher picks them. A compiled variant replaces every build of
the source (the forward ring's units too: give MHC_RING_UNITS to time one). Session 12 found the
ring forward's w-in-shared-memory win this way, session 13 its units (docs/HISTORY.md).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mhc_aot import bench, cuda, device

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# A variant is built as the wheel's binaries are: the same nvcc flags (else it is other code), and as a
# compressed fatbin of its cubin. MLX hashes a kernel's whole binary on every launch (README, Building),
# so a raw cubin (4x the bytes) costs more host time per launch than the shipped binary: session 30's
# "compiled-variant bias", ~17 us a forward at (32, 4, 4096) for mhc_dynamic_coeffs_proj's 124 KB cubin
# against its 29 KB fatbin (session 31).
from build_tools.cuda import NVCC_FLAGS, _fatbin, _toolkit_tool, find_nvcc  # noqa: E402

SHAPES = "1024,32,2048 1024,16,4096 4096,16,1024 1024,32,3072"


def compile_variant(source: str, spec: str, nmaxes=(16, 32)) -> tuple[str, dict[int, tuple[str, bytes]] | None]:
    """(label, {NMAX: (entry name, binary: a compressed fatbin of the cubin)}) of one
    LABEL=[PATH][:DEFINE...] for this GPU's architecture; (label, None) for LABEL= (the shipped binaries)."""
    label, _, rest = spec.partition("=")
    if not rest:
        return label, None
    path, *defines = rest.split(":")
    path = path or str(ROOT / "cuda_src" / f"{source}.cu")
    arch = f"sm_{device.mlx_arch_number()}"
    if "mhc_tma.cuh" in Path(path).read_text():  # TMA's tensormap.replace: the arch-specific target (sm_90a)
        arch += "a"
    nvcc = find_nvcc() or "nvcc"
    fatbinary = _toolkit_tool(nvcc, "fatbinary")
    bins = {}
    for nmax in nmaxes:
        name = re.sub(r"\W", "_", f"{source}_n{nmax}_ab_{label}")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "k.cubin"
            # a DEFINE is passed as -DDEFINE, a word starting with "-" as the nvcc flag it is (-lineinfo)
            flags = [d if d.startswith("-") else f"-D{d}" for d in defines if d]
            cmd = [nvcc, *NVCC_FLAGS, f"-arch={arch}", "-cubin", "-Xptxas=-v", f"-DMHC_NAME={name}",
                   "-DMHC_DTYPE=bf16", f"-DMHC_NMAX={nmax}", f"-I{ROOT / 'cuda_src'}", *flags, path, "-o", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{label}: nvcc failed:\n{r.stderr[-3000:]}")
            regs = [ln.split("info    : ")[-1] for ln in r.stderr.splitlines() if "registers" in ln or "spill" in ln]
            print(f"BUILD {label} n{nmax}: {'; '.join(regs)}", flush=True)
            fat = Path(tmp) / "k.fatbin"
            _fatbin(fatbinary, out, "elf", arch[3:], fat)  # the build's own step (raises with fatbinary's output)
            bins[nmax] = name, fat.read_bytes()
    return label, bins


def use(source: str, bins: dict[int, tuple[str, bytes]] | None, shipped=cuda._binary) -> None:
    def _binary(src, dtype, n, units=1, terms=3):
        name, binary, nmax = shipped(src, dtype, n, units, terms)
        return (*bins[nmax], nmax) if src == source else (name, binary, nmax)

    cuda._binary = shipped if bins is None else _binary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a static forward kernel's source name, e.g. mhc_forward_ring")
    ap.add_argument("variants", nargs="+", help="LABEL=[PATH][:DEFINE...]; the first is the baseline")
    ap.add_argument("--shapes", default=SHAPES, help=f"B,n,C words (default: {SHAPES})")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backward", action="store_true",
                    help="time forward + backward (for a backward kernel's source, e.g. mhc_backward_ring)")
    args = ap.parse_args()
    if not mx.cuda.is_available():
        sys.exit("needs MLX's CUDA backend (mx.cuda.is_available() is False)")
    variants = [compile_variant(args.source, v) for v in args.variants]
    op, _, strategy = args.source.removeprefix("mhc_").partition("_")  # e.g. backward, ring
    if op == "backward" and not args.backward:
        sys.exit(f"{args.source} runs in the backward: pass --backward")
    want = f"bwd {strategy}" if op == "backward" else f"cuda:{strategy}"  # in the runner's note
    for shape in args.shapes.split():
        B, n, C = (int(v) for v in shape.split(","))
        case = bench.Case("throughput", B, n, C, "bfloat16", args.backward)
        inputs = bench.make_inputs(case)
        base = None
        for label, bins in variants:
            use(args.source, bins)
            runner = bench.make_runner("kernels", case, inputs)
            if want not in runner.note:
                sys.exit(f"{shape}: dispatch runs {runner.note}, not {args.source}: pick shapes its rule serves")
            o = runner.call()  # the output, or (with --backward) the output and every gradient
            o = [a.astype(mx.float32) for _, a in tree_flatten(o)]
            base = o if base is None else base
            d = max(mx.max(mx.abs(a - c)).item() for a, c in zip(o, base))
            print(f"DIFF {shape} {label:10s} max|d| {d:.3e} nan {any(mx.any(mx.isnan(a)).item() for a in o)}", flush=True)
        res = {label: [] for label, _ in variants}
        for rnd in range(args.rounds):
            for label, bins in (variants if rnd % 2 == 0 else variants[::-1]):
                use(args.source, bins)
                runner = bench.make_runner("kernels", case, inputs)
                res[label].append(bench.time_runner(runner, "throughput", 30, 5, repeats=5).median_us)
        for label, ms in res.items():
            print(f"AB {shape} {label:10s} {' '.join(f'{m:7.1f}' for m in sorted(ms))}", flush=True)


if __name__ == "__main__":
    main()
