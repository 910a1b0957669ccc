"""Ahead-of-time kernel build, run by setup.py's build_ext: one module per toolchain.

`build_all(kernels_dir)` compiles what the machine's toolchains allow and writes
`kernels_dir/manifest.json`: build facts per toolchain and one row per shipped variant with its
files and their sha256, which the loader and `mhc info` check.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import cpu, cuda, metal
from .variants import VARIANTS

MANIFEST_VERSION = 1


def build_all(kernels_dir: Path, cache: Path, package_version: str, mlx_version: str, log=print) -> dict:
    kernels_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cuda_facts, cuda_rows = cuda.build(kernels_dir, cache, log)
    metal_facts, metal_rows = metal.build(kernels_dir, cache, log)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "package_version": package_version,
        "mlx_version": mlx_version,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.time() - start, 1),
        "toolchains": {"cpu": cpu.facts(), "cuda": cuda_facts, "metal": metal_facts},
        "table_size": len(VARIANTS),
        "variants": cuda_rows + metal_rows,
    }
    (kernels_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log(f"mhc-aot: wrote manifest with {len(manifest['variants'])} kernel variants in {manifest['build_seconds']} s")
    return manifest
