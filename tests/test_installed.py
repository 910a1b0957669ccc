"""The suite tests the installed mhc-aot (with its build outputs), not a bare source tree, and that
installation ships what its manifest lists: kernels are never silently missing."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from backends import GPU_AVAILABLE, KERNEL_BACKENDS
import mhc_aot
from mhc_aot import manifest


def _distribution():
    try:
        return importlib.metadata.distribution("mhc-aot")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mhc-aot is not installed: the tests run against the source tree")


def test_imports_the_installed_package():
    dist = _distribution()
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("editable install: the installed package is the source tree")
    installed = Path(dist.locate_file("mhc_aot/__init__.py")).resolve()
    assert Path(mhc_aot.__file__).resolve() == installed, (
        f"tests imported {mhc_aot.__file__}, not the installed {installed}: the source tree shadows it")


def test_manifest_files_present():
    _distribution()
    rows = manifest.load()["variants"]
    missing = [f"{r['name']}:{tag}" for r in rows for tag in r["files"] if not manifest.Variant(r).path(tag).exists()]
    assert not missing, f"manifest lists kernel files that are not installed: {missing[:5]}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_kernels_shipped(backend):
    assert GPU_AVAILABLE[backend]
    assert manifest.variants(backend), f"{backend} is available but the installed package ships no {backend} kernels"
