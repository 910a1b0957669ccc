"""Metal toolchain: `xcrun -sdk macosx metal -c` each variant to .air, then `metallib` them.

Skipped with one line where xcrun is absent (every non-macOS machine)."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path


def build(kernels_dir: Path, cache: Path, log=print) -> tuple[dict, list[dict]]:
    if platform.system() != "Darwin" or shutil.which("xcrun") is None:
        log("mhc-aot: xcrun (Xcode) not found: Metal kernels skipped (they are built on macOS only)")
        return {"found": False, "reason": "xcrun not found (not macOS)"}, []
    raise RuntimeError("Metal build not implemented yet")
