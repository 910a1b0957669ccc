"""CUDA toolchain: compile every CUDA variant ahead of time with nvcc.

Per variant: `nvcc -ptx` once for the lowest listed arch, then `ptxas` turns that PTX into one
cubin per listed arch (ptxas is ~10x cheaper than a full nvcc call), plus one PTX for the PTX
arch that the driver can JIT on GPUs newer than every cubin. Each cubin and the PTX ship as a
compressed fatbin of that one image (`fatbinary --compress-all`, 2.5-4.5x smaller; the driver
loads a fatbin like a cubin). Small binaries keep MLX's per-launch host cost low: its CUDA
custom-kernel primitive hashes the whole binary on every eval (H100, scripts/launch_cost.py,
inside mx.compile: 9.5 us per queued launch from a 2.5 KB fatbin, 15 us at 32 KB, 41 us at 96 KB).

Environment (documented in README): MHC_AOT_CUDA_ARCHS="80,86,89,90" (cubin archs),
MHC_AOT_CUDA_PTX_ARCH (default: the newest listed), NVCC (path to nvcc), MHC_AOT_BUILD_JOBS.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .variants import VARIANTS, KernelVariant

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "cuda_src"
DEFAULT_ARCHS = "80,86,89,90"
NVCC_FLAGS = ["-O3", "-std=c++17", "--extra-device-vectorization", "-Xptxas=-O3"]
FATBIN_FLAGS = ["--compress-all", "--compress-mode=size"]


def find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _toolkit_tool(nvcc: str, name: str) -> str:
    """A CUDA toolkit program that ships next to nvcc (else on PATH): ptxas, fatbinary."""
    sibling = Path(nvcc).with_name(name)
    found = str(sibling) if sibling.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"CUDA kernel build: `{name}` is neither next to {nvcc} nor on PATH; install the "
                           f"whole CUDA toolkit (it ships nvcc, ptxas and fatbinary together) or set NVCC to "
                           f"that toolkit's nvcc")
    return found


def archs() -> tuple[list[int], int]:
    listed = sorted({int(a.strip().removeprefix("sm_")) for a in
                     os.environ.get("MHC_AOT_CUDA_ARCHS", DEFAULT_ARCHS).split(",") if a.strip()})
    if not listed:
        raise ValueError("MHC_AOT_CUDA_ARCHS is empty: expected e.g. '80,86,89,90'")
    ptx = int(os.environ.get("MHC_AOT_CUDA_PTX_ARCH", listed[-1]))
    return listed, ptx


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"CUDA kernel build failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def _source_hash(v: KernelVariant) -> str:
    h = hashlib.sha256()
    for f in [SRC / f"{v.source}.cu", *sorted(SRC.glob("*.cuh"))]:  # the kernel and every header it may include
        h.update(f.name.encode() + f.read_bytes())
    h.update(repr(sorted(v.defines().items())).encode())
    h.update(repr(NVCC_FLAGS + FATBIN_FLAGS).encode())
    return h.hexdigest()


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def _fatbin(fatbinary: str, image: Path, kind: str, arch: int, out: Path) -> None:
    """One image (kind "elf": a cubin, "ptx": PTX) as a compressed fatbin."""
    _run([fatbinary, f"--create={out}", f"--image3=kind={kind},sm={arch},file={image}", *FATBIN_FLAGS])


def _build_variant(nvcc: str, ptxas: str, fatbinary: str, v: KernelVariant, out_dir: Path, cache: Path,
                   cubin_archs: list[int], ptx_arch: int) -> dict:
    # a variant with min_arch (thread block clusters: sm_90) gets the listed archs from there on and
    # PTX for at least min_arch; the loader's dispatch never picks it on an older GPU
    cubin_archs = [a for a in cubin_archs if a >= v.min_arch]
    ptx_arch = max(ptx_arch, v.min_arch)
    key = _source_hash(v)
    defines = [f"-D{k}={val}" for k, val in v.defines().items()]
    src = SRC / f"{v.source}.cu"
    if v.arch_exact:
        return _build_arch_exact(nvcc, fatbinary, v, out_dir, cache, cubin_archs, key, defines, src)
    cdir = cache / f"{v.name}-{key[:16]}-{'_'.join(map(str, cubin_archs))}-{ptx_arch}"
    files = {f"sm_{a}": f"{v.name}.sm_{a}.fatbin" for a in cubin_archs}
    files["ptx"] = f"{v.name}.compute_{ptx_arch}.fatbin"
    if not all((cdir / f).exists() for f in files.values()):
        cdir.mkdir(parents=True, exist_ok=True)
        base = [nvcc, *NVCC_FLAGS, "-I", str(SRC), *defines, "-ptx", str(src)]
        low = cubin_archs[0] if cubin_archs else ptx_arch
        low_ptx = cdir / f"{v.name}.compute_{low}.lowptx"
        _run(base[:-2] + [f"-arch=compute_{low}", "-ptx", str(src), "-o", str(low_ptx)])
        for a in cubin_archs:
            cubin = cdir / f"{v.name}.sm_{a}.cubin"
            _run([ptxas, "-O3", f"-arch=sm_{a}", str(low_ptx), "-o", str(cubin)])
            _fatbin(fatbinary, cubin, "elf", a, cdir / files[f"sm_{a}"])
        ptx = cdir / f"{v.name}.compute_{ptx_arch}.ptx"
        if ptx_arch == low:
            shutil.copy(low_ptx, ptx)
        else:
            _run(base[:-2] + [f"-arch=compute_{ptx_arch}", "-ptx", str(src), "-o", str(ptx)])
        _fatbin(fatbinary, ptx, "ptx", ptx_arch, cdir / files["ptx"])
    return _entry(v, key, cdir, files, out_dir)


def _entry(v: KernelVariant, key: str, cdir: Path, files: dict, out_dir: Path) -> dict:
    entry = {**v.row(), "backend": "cuda", "source_sha256": key, "files": {}, "sha256": {}}
    for tag, f in files.items():
        data = (cdir / f).read_bytes()
        (out_dir / f).write_bytes(data)
        entry["files"][tag] = f"cuda/{f}"
        entry["sha256"][tag] = hashlib.sha256(data).hexdigest()
    return entry


def _build_arch_exact(nvcc: str, fatbinary: str, v: KernelVariant, out_dir: Path, cache: Path, cubin_archs: list[int],
                      key: str, defines: list[str], src: Path) -> dict:
    """An arch_exact variant: one sm_<min_arch>a cubin, shipped under tag sm_<min_arch> when that arch is
    listed (else no file: the dispatch never picks it), and no PTX."""
    a = v.min_arch
    files = {f"sm_{a}": f"{v.name}.sm_{a}a.fatbin"} if a in cubin_archs else {}
    cdir = cache / f"{v.name}-{key[:16]}-sm_{a}a"
    if files and not (cdir / files[f"sm_{a}"]).exists():
        cdir.mkdir(parents=True, exist_ok=True)
        cubin = cdir / f"{v.name}.sm_{a}a.cubin"
        _run([nvcc, *NVCC_FLAGS, "-I", str(SRC), *defines, f"-arch=sm_{a}a", "-cubin", str(src), "-o", str(cubin)])
        _run([fatbinary, f"--create={cdir / files[f'sm_{a}']}", f"--image3=kind=elf,sm={a}a,file={cubin}", *FATBIN_FLAGS])
    return _entry(v, key, cdir, files, out_dir)


def build(kernels_dir: Path, cache: Path, log=print) -> tuple[dict, list[dict]]:
    """Compile all CUDA variants into kernels_dir/cuda. Returns (toolchain facts, manifest rows)."""
    nvcc = find_nvcc()
    if nvcc is None:
        log("mhc-aot: nvcc not found (set NVCC or CUDA_HOME): CUDA kernels skipped")
        return {"found": False, "reason": "nvcc not found"}, []
    ptxas, fatbinary = _toolkit_tool(nvcc, "ptxas"), _toolkit_tool(nvcc, "fatbinary")
    cubin_archs, ptx_arch = archs()
    out_dir = kernels_dir / "cuda"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    todo = [v for v in VARIANTS if (SRC / f"{v.source}.cu").exists()]
    jobs = int(os.environ.get("MHC_AOT_BUILD_JOBS", os.cpu_count() or 2))
    log(f"mhc-aot: nvcc building {len(todo)} CUDA variants for sm_{','.join(map(str, cubin_archs))}"
        f" + compute_{ptx_arch} PTX with {jobs} jobs")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(lambda v: _build_variant(nvcc, ptxas, fatbinary, v, out_dir, cache, cubin_archs, ptx_arch), todo))
    facts = {"found": True, "nvcc": nvcc, "version": nvcc_version(nvcc), "flags": NVCC_FLAGS, "fatbin_flags": FATBIN_FLAGS,
             "archs": [f"sm_{a}" for a in cubin_archs], "ptx_arch": f"compute_{ptx_arch}"}
    return facts, rows
