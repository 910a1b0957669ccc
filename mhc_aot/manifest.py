"""The shipped kernel manifest (mhc_aot/kernels/manifest.json, written by build_tools at build
time): lookup of variants by op / strategy / dtype / n, and integrity checks of their files."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"
MANIFEST_PATH = KERNELS_DIR / "manifest.json"

DTYPE_TAGS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class KernelArtifactError(RuntimeError):
    """A shipped kernel is missing or corrupted; the message names the fix."""


REINSTALL_HINT = ("reinstall mhc-aot from source with the toolchain present "
                  "(`pip install --force-reinstall --no-cache-dir .` with nvcc on PATH for CUDA, "
                  "Xcode for Metal), or pass backend='portable'")


@functools.lru_cache(maxsize=1)
def load() -> dict:
    """The manifest as written at build time; raises KernelArtifactError if absent or unreadable."""
    if not MANIFEST_PATH.exists():
        raise KernelArtifactError(f"kernel manifest {MANIFEST_PATH} is missing: {REINSTALL_HINT}")
    try:
        return json.loads(MANIFEST_PATH.read_text())
    except json.JSONDecodeError as e:
        raise KernelArtifactError(f"kernel manifest {MANIFEST_PATH} is corrupted ({e}): {REINSTALL_HINT}") from e


@dataclass(frozen=True)
class Variant:
    row: dict

    @property
    def name(self) -> str:
        return self.row["name"]

    @property
    def nmax(self) -> int:
        return self.row["nmax"]

    def path(self, tag: str) -> Path:
        return KERNELS_DIR / self.row["files"][tag]

    def read(self, tag: str, verify: bool = False) -> bytes:
        """The bytes of file `tag` (e.g. 'sm_90', 'ptx'); verify=True checks its sha256."""
        p = self.path(tag)
        if not p.exists():
            raise KernelArtifactError(f"kernel file {p} of variant {self.name} is missing: {REINSTALL_HINT}")
        data = p.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != self.row["sha256"][tag]:
            raise KernelArtifactError(f"kernel file {p} of variant {self.name} does not match its sha256 "
                                      f"in the manifest (corrupted): {REINSTALL_HINT}")
        return data


def variants(backend: str) -> list[Variant]:
    return [Variant(r) for r in load()["variants"] if r["backend"] == backend]


def find(backend: str, source: str, dtype: str | None = None, n: int | None = None, units: int = 1,
         terms: int = 3) -> Variant:
    """The variant of kernel `source` for dtype (tag) with the smallest compile-time NMAX >= n,
    else (n above every NMAX, or n None) its generic NMAX-0 variant; `units`: the forward ring's
    groups a slot (variants.RING_UNITS; 1 for every other kernel); `terms`: the projection's
    bfloat16 terms of phi (variants.py: 1 or 3; 3 for every other kernel)."""
    candidates = [v for v in variants(backend) if v.row["source"] == source and v.row["dtype"] == dtype
                  and v.row.get("units", 1) == units and v.row.get("terms", 3) == terms]
    fitting = sorted((v for v in candidates if n is not None and v.nmax >= n), key=lambda v: v.nmax)
    candidates = fitting[:1] or [v for v in candidates if v.nmax == 0]
    if not candidates:
        raise KernelArtifactError(f"no shipped {backend} kernel {source} for dtype={dtype}, n={n}"
                                  f"{f', units={units}' if units != 1 else ''}{f', terms={terms}' if terms != 3 else ''}: {REINSTALL_HINT}")
    return candidates[0]


def max_nmax(backend: str, source: str) -> int:
    return max((v.nmax for v in variants(backend) if v.row["source"] == source), default=0)


def verify_all(backend: str | None = None) -> list[str]:
    """Problems found checking every shipped file against its sha256 (empty list = all good)."""
    problems, checked = [], set()
    for r in load()["variants"]:
        if backend and r["backend"] != backend:
            continue
        v = Variant(r)
        for tag in r["files"]:
            if r["files"][tag] in checked:  # Metal variants share one metallib: hash it once
                continue
            checked.add(r["files"][tag])
            try:
                v.read(tag, verify=True)
            except KernelArtifactError as e:
                problems.append(str(e))
    return problems
