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


def test_cuda_variants_respect_min_arch():
    """A variant with min_arch (the cluster forward: sm_90) ships cubins from that arch on and PTX for at
    least it, never a binary an older GPU would load; an arch_exact one (TMA: sm_90a) only its one cubin;
    every other variant ships what the build listed."""
    _distribution()
    rows = [r for r in manifest.load()["variants"] if r.get("backend") == "cuda"]
    if not rows:
        pytest.skip("no CUDA kernels in this install (no nvcc at build time)")
    listed = {tag for r in rows if not r.get("min_arch") for tag in r["files"]}
    exact = [r for r in rows if r.get("arch_exact")]
    assert exact, "the variant table has arch_exact variants (mhc_dynamic_coeffs_pre): the manifest lost them"
    for r in exact:  # one sm_<min_arch>a cubin under tag sm_<min_arch> where that arch was built, no PTX
        want = {f"sm_{r['min_arch']}"} & listed
        assert set(r["files"]) == want, f"{r['name']}: files {sorted(r['files'])}, expected {sorted(want)}"
        assert all(f.endswith(f"sm_{r['min_arch']}a.fatbin") for f in r["files"].values()), r["files"]
    gated = [r for r in rows if r.get("min_arch") and not r.get("arch_exact")]
    assert gated, "the variant table has min_arch variants (mhc_forward_cluster): the manifest lost them"
    for r in gated:
        sms = [int(t[3:]) for t in r["files"] if t.startswith("sm_")]
        assert all(a >= r["min_arch"] for a in sms), f"{r['name']}: cubins {sms} below min_arch {r['min_arch']}"
        assert {f"sm_{a}" for a in sms} == {t for t in listed if t.startswith("sm_") and int(t[3:]) >= r["min_arch"]}
        ptx_arch = int(r["files"]["ptx"].rsplit("compute_", 1)[1].split(".")[0])
        assert ptx_arch >= r["min_arch"], f"{r['name']}: PTX for compute_{ptx_arch} < min_arch {r['min_arch']}"
