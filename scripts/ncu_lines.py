"""Nsight Compute's warp-state samples and executed instructions of one kernel, summed per source line.

`ncu --page source --csv --print-source sass` prints them per SASS instruction only (the CUDA view holds
the source text without metrics); this joins them with the line table of `nvdisasm -g`, by offset in the
kernel, so a persistent kernel whose warps play different roles shows where each role spends its time
(session 32: the one-read kernel's x_in warps, its spin loops). On the device, the kernel built with
-lineinfo (scripts/ncu_dynamic_probe.py's LABEL=:-lineinfo) and the same cubin disassembled:

  ncu -k regex:coeffs_pre -c 1 --section SourceCounters --section WarpStateStats -f -o cp \\
      python3 scripts/ncu_dynamic_probe.py 8192 4 4096 "li=:-lineinfo:MHC_PHI_TERMS=1"
  ncu -i cp.ncu-rep --page source --csv --print-source sass > cp_sass.csv
  nvcc -O3 -std=c++17 --extra-device-vectorization -Xptxas=-O3 -arch=sm_90a -cubin -lineinfo -DMHC_NAME=k \\
      -DMHC_DTYPE=bf16 -DMHC_NMAX=4 -DMHC_PHI_TERMS=1 -Icuda_src cuda_src/mhc_dynamic_coeffs_pre.cu -o cp.cubin
  "$(dirname "$(readlink -f "$(command -v nvcc)")")"/nvdisasm -g -c cp.cubin > cp_lines.sass

(build_tools/cuda.py's NVCC_FLAGS and the variant's defines: the two must be the same code; every
instruction whose opcode differs between the two is counted and reported). Then, anywhere:

  python scripts/ncu_lines.py cp_sass.csv cp_lines.sass [--top 40] [--range FILE:FIRST-LAST]

prints the top source lines by samples (share of samples, of executed instructions, its most frequent
stall reason and the line's text from cuda_src/: run it at the commit that was profiled, or the text
is off where lines moved), and with --range the stall reasons summed over those lines and their
instructions one by one.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import signal
from pathlib import Path

CUDA_SRC = Path(__file__).resolve().parent.parent / "cuda_src"


def line_table(path: Path) -> dict[int, tuple[tuple[str, int], str]]:
    """{offset: ((file name, line), instruction)} from `nvdisasm -g` output."""
    table, cur = {}, ("?", 0)
    for text in path.read_text().splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', text)
        if m:
            cur = (Path(m.group(1)).name, int(m.group(2)))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", text)
        if m:
            table[int(m.group(1), 16)] = (cur, m.group(2))
    return table


def opcode(instr: str) -> str:
    words = instr.split()
    words = words[1:] if words and words[0].startswith("@") else words
    return words[0].split(".")[0] if words else ""


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # piped into head: stop quietly
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sass_csv", type=Path, help="ncu -i REPORT --page source --csv --print-source sass")
    ap.add_argument("lines", type=Path, help="nvdisasm -g -c CUBIN of the same kernel")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--range", default=None, help="FILE:FIRST-LAST (e.g. mhc_dynamic_coeffs_pre.cu:390-420)")
    args = ap.parse_args()

    rows = list(csv.reader(args.sass_csv.open()))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr, data = rows[head], [r for r in rows[head + 1:] if r and r[0].startswith("0x")]
    col = {name: i for i, name in enumerate(hdr)}
    samples, executed = col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"]
    stalls = [i for i, name in enumerate(hdr) if name.startswith("stall_") and "Not Issued" not in name]
    table = line_table(args.lines)
    base = int(data[0][col["Address"]], 16)
    num = lambda r, i: int(float(r[i] or 0))  # noqa: E731

    per_line: dict = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    total_s = total_x = 0
    mismatched = 0
    for r in data:
        where, instr = table.get(int(r[col["Address"]], 16) - base, (("?", 0), ""))
        mismatched += opcode(instr) != opcode(r[col["Source"]])
        acc = per_line[where]
        acc[0] += num(r, samples)
        acc[1] += num(r, executed)
        for i in stalls:
            acc[2][hdr[i]] += num(r, i)
        total_s += num(r, samples)
        total_x += num(r, executed)
    print(f"{len(data)} instructions, {total_s} samples, {total_x} warp instructions executed; "
          f"{mismatched} instructions whose opcode differs from the line table's (0: the same code)")

    sources: dict[str, list[str]] = {}

    def text(where) -> str:
        name, line = where
        if name not in sources:
            p = CUDA_SRC / name
            sources[name] = p.read_text().splitlines() if p.exists() else []
        src = sources[name]
        return src[line - 1].strip()[:80] if 0 < line <= len(src) else ""

    print(f"{'samples':>8s} {'instr':>7s}  line")
    for where, (s, x, st) in sorted(per_line.items(), key=lambda kv: -kv[1][0])[: args.top]:
        top = st.most_common(1)[0][0] if s else ""
        print(f"{100 * s / max(total_s, 1):7.1f}% {100 * x / max(total_x, 1):6.1f}%  {where[0]}:{where[1]}  "
              f"[{top}]  {text(where)}")

    if args.range:
        name, _, span = args.range.rpartition(":")
        first, _, last = span.partition("-")
        inside = lambda where: where[0] == name and int(first) <= where[1] <= int(last or first)  # noqa: E731
        reasons = collections.Counter()
        for where, (_, _, st) in per_line.items():
            if inside(where):
                reasons.update(st)
        n = sum(reasons.values())
        print(f"\n{args.range}: stall reasons of its samples")
        for reason, count in reasons.most_common(12):
            print(f"  {reason:28s} {100 * count / max(n, 1):5.1f}%")
        print(f"\n{args.range}: instruction by instruction (offset, line, samples, executed, top reason)")
        for r in data:
            off = int(r[col["Address"]], 16) - base
            where, _ = table.get(off, (("?", 0), ""))
            if inside(where):
                top = max(stalls, key=lambda i: num(r, i))
                print(f"  {off:06x} {where[1]:5d} {r[col['Source']].strip()[:56]:56s} {num(r, samples):5d} "
                      f"{num(r, executed):9d} {hdr[top] if num(r, samples) else ''}")


if __name__ == "__main__":
    main()
