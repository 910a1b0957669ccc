"""Metal toolchain: `xcrun -sdk macosx metal -c` each variant to .air, then `metallib` them all
into one `mhc_aot/kernels/mhc_aot.metallib`, recorded in the manifest.

Skipped with one line where xcrun is absent (every non-macOS machine). On any machine:

  python -m build_tools.metal --dry-run   the exact commands a macOS build runs, one per line
  python -m build_tools.metal --check     the Linux syntax-and-type check of metal_src/ (clang)

and tests run the kernels under a CPU emulation (Emulated, g++ against
metal_src/check/emulate/metal_stdlib).

Each kernel's function is named as MLX's `mx.fast.metal_kernel` names the kernel it looks up
(`custom_kernel_<variant>_<input types>_<output types>`, see mhc_aot/_shim/metal_preload.cpp),
and its buffer arguments are parsed from the source into the manifest (`abi`), so the loader
can bind and check them. The syntax-and-type check compiles every variant, with its macros, as
C++ for OpenCL against metal_src/check/metal_stdlib (a stand-in header: address spaces are
real there, so a device pointer passed where a threadgroup one is expected is an error). It is
a compiler pass over the sources, not a Metal build: it never runs or generates a kernel.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .variants import VARIANTS, KernelVariant

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "metal_src"
STAND_IN = SRC / "check"  # holds the stand-in `metal_stdlib`
METALLIB = "mhc_aot.metallib"
# MLX's own flags for its kernels (mlx/backend/metal/kernels/CMakeLists.txt) plus the language
# version that has `bfloat` (Metal 3.1, macOS 14: MLX's minimum too).
METAL_FLAGS = ["-x", "metal", "-std=metal3.1", "-mmacosx-version-min=14.0", "-Wall", "-Wextra", "-fno-fast-math",
               "-Wno-c++17-extensions", "-Wno-c++20-extensions", "-Wmetal-addr-spaces"]
# The Linux check: clang's C++ for OpenCL (real address spaces, kernel-scope threadgroup arrays).
CHECK_FLAGS = ["-x", "clcpp", "-cl-std=clc++2021", "-fsyntax-only", "-cl-no-stdinc", "-Wall", "-Wextra", "-Werror",
               "-Wno-unused-parameter"]

# MLX's type strings (mlx/backend/common/compiled.cpp get_type_string) per element type.
MLX_TYPES = {"f32": "float", "f16": "float16_t", "bf16": "bfloat16_t"}
# The scalar tail of a CUDA signature arrives as this int32 input, after the CUDA inputs. MLX
# binds arrays of fewer than 8 elements in the constant space and renames the kernel for them
# ("c" suffix), so the launcher always sends at least SCALAR_SLOTS; the same rule holds for
# every input (small parameter arrays are padded to SCALAR_SLOTS elements).
SCALARS = "scalars"
SCALAR_SLOTS = 8
THREADS = 256  # metal_src/mhc_common.h (the launcher's threadgroup size)
# Kernels the launcher may run with more threads per threadgroup (metal_src/mhc_sinkhorn_common.h
# SMALL_THREADS): the preload checks that their pipelines allow it.
MAX_THREADS = {"mhc_sinkhorn_fwd": 1024, "mhc_sinkhorn_bwd": 1024}
# Metal rules C++ does not check, linted on the source text (Metal Shading Language spec,
# "C++14 features not available": lambdas, new/delete, goto, virtual, exceptions, std library).
FORBIDDEN = {r"\[[&=]?\]\s*\(": "lambda expression", r"\bnew\b": "new", r"\bdelete\b": "delete", r"\bgoto\b": "goto",
             r"\bvirtual\b": "virtual function", r"\bthrow\b": "exception", r"\btry\b": "exception",
             r"#include\s*<(?!metal_stdlib>)": "include other than <metal_stdlib>", r"\bstd::": "C++ standard library"}


# ------------------------------------------------------------------ the kernel ABI, from the source
@dataclass(frozen=True)
class Buffer:
    index: int
    name: str
    ctype: str  # "T", "float", "Scalars", ...
    role: str  # "input" (const), "scalars", "output"


@dataclass(frozen=True)
class Abi:
    source: str
    buffers: tuple[Buffer, ...]
    scalars: tuple[tuple[str, str], ...]  # (type, name) of struct Scalars, in order

    @property
    def inputs(self) -> list[Buffer]:
        return [b for b in self.buffers if b.role in ("input", "scalars")]

    @property
    def outputs(self) -> list[Buffer]:
        return [b for b in self.buffers if b.role == "output"]


_KERNEL = re.compile(r"kernel\s+void\s+MHC_ENTRY\s*\((?P<params>.*?)\)\s*\{", re.S)
_BUFFER = re.compile(r"^(?P<space>device|constant)\s+(?P<const>const\s+)?(?P<type>\w+)\s*(?P<ref>[*&])\s*(?P<name>\w+)$")
_SCALARS = re.compile(r"struct\s+Scalars\s*\{(?P<body>[^}]*)\}", re.S)


def strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def parse_abi(source: str, text: str | None = None) -> Abi:
    """The buffer arguments of metal_src/<source>.metal's kernel, in binding order."""
    text = strip_comments(text if text is not None else (SRC / f"{source}.metal").read_text())
    m = _KERNEL.search(text)
    if not m:
        raise ValueError(f"metal_src/{source}.metal: no `kernel void MHC_ENTRY(...)`")
    buffers = []
    for raw in m.group("params").split(","):
        p = " ".join(raw.split())
        attr = re.search(r"\[\[\s*buffer\((\d+)\)\s*\]\]", p)
        if not attr:
            continue  # a thread-position attribute, not a buffer
        decl = _BUFFER.match(p[: attr.start()].strip())
        if not decl:
            raise ValueError(f"metal_src/{source}.metal: cannot read buffer argument {p!r}")
        role = "scalars" if decl["type"] == "Scalars" else "input" if decl["const"] or decl["space"] == "constant" else "output"
        buffers.append(Buffer(int(attr.group(1)), decl["name"], decl["type"], role))
    if [b.index for b in buffers] != list(range(len(buffers))):
        raise ValueError(f"metal_src/{source}.metal: buffer indices {[b.index for b in buffers]} are not 0, 1, ...")
    roles = [b.role for b in buffers]
    if roles != sorted(roles, key=("input", "scalars", "output").index) or roles.count("scalars") > 1:
        raise ValueError(f"metal_src/{source}.metal: buffers must be inputs, then `scalars`, then outputs: {roles}")
    sm = _SCALARS.search(text)
    scalars = tuple((t, n) for t, n in re.findall(r"(\w+)\s+(\w+)\s*;", sm.group("body"))) if sm else ()
    if ("scalars" in roles) != bool(scalars):
        raise ValueError(f"metal_src/{source}.metal: a `constant Scalars&` argument needs a `struct Scalars`")
    return Abi(source, tuple(buffers), scalars)


def mlx_type(ctype: str, v: KernelVariant) -> str:
    if ctype == "T":
        return MLX_TYPES[v.dtype or "f32"]
    if ctype == "Scalars":
        return "int32_t"
    return {"float": "float", "int": "int32_t", "uint": "uint32_t"}[ctype]


def entry_name(v: KernelVariant, abi: Abi | None = None) -> str:
    """The function name MLX's metal_kernel gives a call with this variant's buffers (inputs of
    >= 8 elements): custom_kernel_<name>, then _<type> per input, then per output
    (mlx/backend/common/metal_kernel.cpp; computed again, for checking, by the shim)."""
    abi = abi or parse_abi(v.source)
    return "custom_kernel_" + v.name + "".join("_" + mlx_type(b.ctype, v) for b in abi.inputs + abi.outputs)


def manifest_abi(v: KernelVariant, abi: Abi) -> dict:
    return {"function": entry_name(v, abi),
            "inputs": [[b.name, mlx_type(b.ctype, v)] for b in abi.inputs],
            "outputs": [[b.name, mlx_type(b.ctype, v)] for b in abi.outputs],
            "scalars": [list(s) for s in abi.scalars],
            "threads": MAX_THREADS.get(v.source, THREADS)}


def defines(v: KernelVariant, abi: Abi | None = None) -> dict[str, str]:
    return {**v.defines(), "MHC_ENTRY": entry_name(v, abi)}


def sources_present() -> list[KernelVariant]:
    return [v for v in VARIANTS if (SRC / f"{v.source}.metal").exists()]


def lint(text: str) -> list[str]:
    """Metal-only rules the C++ check cannot see (see FORBIDDEN)."""
    code = strip_comments(text)
    return [what for pattern, what in FORBIDDEN.items() if re.search(pattern, code)]


# ------------------------------------------------------------------ commands
def _source_hash(v: KernelVariant) -> str:
    h = hashlib.sha256()
    for f in [SRC / f"{v.source}.metal", *sorted(SRC.glob("*.h"))]:
        h.update(f.name.encode() + f.read_bytes())
    h.update(repr(sorted(defines(v).items())).encode())
    h.update(repr(METAL_FLAGS).encode())
    return h.hexdigest()


def compile_command(v: KernelVariant, air: Path) -> list[str]:
    return ["xcrun", "-sdk", "macosx", "metal", *METAL_FLAGS, "-I", str(SRC),
            *[f"-D{k}={val}" for k, val in defines(v).items()], "-c", str(SRC / f"{v.source}.metal"), "-o", str(air)]


def link_command(airs: list[Path], out: Path) -> list[str]:
    return ["xcrun", "-sdk", "macosx", "metallib", *map(str, airs), "-o", str(out)]


def air_path(v: KernelVariant, cache: Path) -> Path:
    return cache / f"{v.name}-{_source_hash(v)[:16]}.air"


def check_command(v: KernelVariant, source: Path | None = None, clang: str = "clang") -> list[str]:
    """The Linux syntax-and-type check of one variant (source: another file in its place, e.g. a
    deliberately broken copy)."""
    src = source or SRC / f"{v.source}.metal"
    return [clang, *CHECK_FLAGS, "-isystem", str(STAND_IN), "-I", str(src.parent), "-I", str(SRC),
            *[f"-D{k}={val}" for k, val in defines(v, parse_abi(v.source, src.read_text())).items()], str(src)]


def find_clang() -> str | None:
    return os.environ.get("MHC_AOT_CLANG") or shutil.which("clang")


def check_variant(v: KernelVariant, source: Path | None = None, clang: str | None = None) -> tuple[bool, str]:
    """(passed, compiler output + lint findings) of the Linux check of one variant."""
    clang = clang or find_clang()
    if clang is None:
        raise RuntimeError("clang not found: the Metal source check needs it (apt-get install clang)")
    src = source or SRC / f"{v.source}.metal"
    try:
        cmd = check_command(v, src, clang)
    except ValueError as e:  # the kernel signature itself is unreadable
        return False, str(e)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    problems = [f"{src.name}: Metal forbids {what}" for what in lint(src.read_text())]
    for h in sorted(SRC.glob("*.h")):
        problems += [f"{h.name}: Metal forbids {what}" for what in lint(h.read_text())]
    out = proc.stdout + proc.stderr + "".join(p + "\n" for p in problems)
    return proc.returncode == 0 and not problems, out


def check_all(jobs: int | None = None, log=print) -> list[tuple[KernelVariant, str]]:
    """Check every variant; returns the failures (variant, output)."""
    todo = sources_present()
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        results = list(pool.map(check_variant, todo))
    failures = [(v, out) for v, (ok, out) in zip(todo, results) if not ok]
    log(f"mhc-aot: Linux syntax-and-type check of metal_src (clang, C++ for OpenCL against the stand-in "
        f"metal_stdlib): {len(todo) - len(failures)}/{len(todo)} variants pass")
    return failures


# ------------------------------------------------------------------ CPU emulation (tests)
# The kernels RUN on Linux too: each variant is compiled as C++ by g++ against the emulation
# header metal_src/check/emulate/metal_stdlib (threads of a threadgroup are fibers of
# tests/emu_fiber.h, barriers and simdgroup reductions are emulated) and launched by a generated driver that binds
# buffers by index exactly as MLX does. Proves the algorithm and the indexing, not Metal.
EMULATE = STAND_IN / "emulate"
FIBER = SRC.parent / "tests" / "emu_fiber.h"  # the fibers, shared with the CUDA emulation
_TG_ARRAY = re.compile(r"^(\s*)threadgroup(\s+\w+\s+\w+\s*\[[^\];]+\];)", re.M)  # kernel-scope arrays
_ATTR_VALUES = {"thread_index_in_threadgroup": "tid", "thread_index_in_simdgroup": "tid % 32u",
                "simdgroup_index_in_threadgroup": "tid / 32u", "threadgroup_position_in_grid": "tgid",
                "threadgroups_per_grid": "ntg", "threads_per_threadgroup": "tpg"}


def emulation_source(v: KernelVariant) -> str:
    """metal_src/<source>.metal with its threadgroup arrays made function statics (shared by the
    emulated threadgroup), plus `mhc_emu_launch(bufs, gx, gy, gz, tx)`: grid in threads,
    threadgroups of tx threads run one after the other, edge groups partial (dispatch_threads)."""
    text = _TG_ARRAY.sub(r"\1static\2", (SRC / f"{v.source}.metal").read_text())
    params = _KERNEL.search(strip_comments(text)).group("params")
    args = []
    for raw in params.split(","):
        p = " ".join(raw.split())
        attr = re.search(r"\[\[\s*(\w+)(?:\((\d+)\))?\s*\]\]", p)
        if attr.group(1) == "buffer":
            d = _BUFFER.match(p[: attr.start()].strip())
            i = attr.group(2)
            args.append(f"*({d['type']}*)bufs[{i}]" if d["ref"] == "&" else f"({d['const'] or ''}{d['type']}*)bufs[{i}]")
        else:
            args.append(_ATTR_VALUES[attr.group(1)])
    return text + f"""
extern "C" void mhc_emu_launch(void** bufs, unsigned gx, unsigned gy, unsigned gz, unsigned tx) {{
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x * tx < gx; ++x) {{
        const unsigned threads = gx - x * tx < tx ? gx - x * tx : tx;
        const uint3 tgid{{x, y, z}}, ntg{{(gx + tx - 1) / tx, gy, gz}}, tpg{{threads, 1, 1}};
        (void)tgid; (void)ntg; (void)tpg;
        mhc_emu::run_threadgroup(threads, [&](uint tid) {{ MHC_ENTRY({", ".join(args)}); }});
      }}
}}
"""


def build_emulation(v: KernelVariant, cache: Path) -> Path:
    """The emulation of one variant as a shared library (cached by content)."""
    src = emulation_source(v)
    h = hashlib.sha256(src.encode())
    for f in [*sorted(SRC.glob("*.h")), EMULATE / "metal_stdlib", FIBER]:
        h.update(f.read_bytes())
    h.update(repr(sorted(defines(v).items())).encode())
    so = cache / f"{v.name}-{h.hexdigest()[:16]}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cpp = so.with_suffix(f".{os.getpid()}.cpp")
        cpp.write_text(src)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-w", "-isystem", str(EMULATE), "-I", str(SRC), "-I", str(FIBER.parent),
               *[f"-D{k}={val}" for k, val in defines(v).items()], "-x", "c++", str(cpp), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulation build of {v.name} failed: {shlex.join(cmd)}\n{proc.stderr[-4000:]}")
        tmp.replace(so)
        cpp.unlink(missing_ok=True)
    return so


class Emulated:
    """One variant, runnable on the CPU: run(arrays, grid, threads) with numpy arrays bound to
    buffers 0, 1, ... (inputs, the scalars array, outputs), grid in threads as MLX takes it."""

    def __init__(self, v: KernelVariant, cache: Path):
        import ctypes

        self.variant = v
        self.lib = ctypes.CDLL(str(build_emulation(v, cache)))
        self.lib.mhc_emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), *[ctypes.c_uint] * 4]

    def run(self, arrays, grid: tuple[int, int, int], threads: int) -> None:
        import ctypes

        ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        self.lib.mhc_emu_launch(ptrs, grid[0], grid[1], grid[2], min(threads, grid[0]))


# ------------------------------------------------------------------ build
def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"Metal kernel build failed: {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")


def metal_version() -> str:
    out = subprocess.run(["xcrun", "-sdk", "macosx", "metal", "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def plan(kernels_dir: Path, cache: Path) -> tuple[list[tuple[KernelVariant, list[str]]], list[str]]:
    """(per-variant compile commands, the metallib link command) of a build."""
    todo = sources_present()
    compiles = [(v, compile_command(v, air_path(v, cache))) for v in todo]
    return compiles, link_command([air_path(v, cache) for v in todo], kernels_dir / METALLIB)


def build(kernels_dir: Path, cache: Path, log=print) -> tuple[dict, list[dict]]:
    """Compile all Metal variants into kernels_dir/mhc_aot.metallib. Returns (facts, manifest rows)."""
    if platform.system() != "Darwin" or shutil.which("xcrun") is None:
        log("mhc-aot: xcrun (Xcode) not found: Metal kernels skipped (they are built on macOS only)")
        return {"found": False, "reason": "xcrun not found (not macOS)"}, []
    compiles, link = plan(kernels_dir, cache)
    cache.mkdir(parents=True, exist_ok=True)
    jobs = int(os.environ.get("MHC_AOT_BUILD_JOBS", os.cpu_count() or 2))
    log(f"mhc-aot: metal building {len(compiles)} Metal variants with {jobs} jobs")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda vc: None if air_path(vc[0], cache).exists() else _run(vc[1]), compiles))
    out = kernels_dir / METALLIB
    out.unlink(missing_ok=True)
    _run(link)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    rows = []
    for v, _ in compiles:
        abi = parse_abi(v.source)
        rows.append({**v.row(), "backend": "metal", "source_sha256": _source_hash(v), "files": {"metallib": METALLIB},
                     "sha256": {"metallib": digest}, "abi": manifest_abi(v, abi)})
    facts = {"found": True, "metal": metal_version(), "flags": METAL_FLAGS, "metallib": METALLIB,
             "archs": ["air64 (compiled for the GPU by the driver at load)"]}
    return facts, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m build_tools.metal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the exact build commands, run nothing")
    ap.add_argument("--check", action="store_true", help="run the Linux syntax-and-type check of metal_src")
    ap.add_argument("--kernels-dir", type=Path, default=ROOT / "mhc_aot" / "kernels")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "metal-kernel-cache")
    args = ap.parse_args(argv)
    if args.check:
        failures = check_all()
        for v, out in failures:
            print(f"--- {v.name}\n{out}", file=sys.stderr)
        return 1 if failures else 0
    if args.dry_run:
        compiles, link = plan(args.kernels_dir, args.cache)
        print(f"# {len(compiles)} Metal variants -> {args.kernels_dir / METALLIB}")
        for _, cmd in compiles:
            print(shlex.join(cmd))
        print(shlex.join(link))
        return 0
    facts, rows = build(args.kernels_dir, args.cache)
    print(f"{len(rows)} variants; {facts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
