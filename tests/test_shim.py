"""mhc_aot._shim, the pybind11 native side, on the machine the suite runs on (Linux in CI).

Shape table: none (no numerics). Checked here:
  - build_info(): compiler, flags, and which optional parts this build has (and why not);
  - the CUDA driver side (dlopen'd at call time): device facts and cubin load checks where a
    driver is present, a clear {'available': False, 'reason': ...} where it is not (the cubin
    checks are SKIPPED without a driver, saying so);
  - the Metal side that runs anywhere: metal_kernel_key(), the one function computing the name
    and library-cache key MLX's mx.fast.metal_kernel uses. LINUX CHECK of that key: for every
    Metal variant, the source it assumes equals the source MLX 0.32.4 itself generates (read
    back from verbose=True under export tracing), and its hash is libc++'s std::hash (checked
    against real libc++ where clang and libc++ are installed, against pinned values otherwise).
  - metal_preload() off macOS: unavailable, with the reason. The preload itself never ran here.
Tolerance table: none. Reference: MLX's own generated source; libc++'s std::hash<std::string>.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mhc_aot
from mhc_aot import _shim, cuda, cuda_dynamic, manifest  # noqa: F401 (cuda_dynamic: its BLOCK_THREADS entries)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # build_tools is not installed; appended so the installed mhc_aot still wins

DRIVER = _shim.cuda_device_facts()
needs_driver = pytest.mark.skipif(not DRIVER["available"], reason=f"no CUDA driver here: {DRIVER.get('reason')}")


# ---------------------------------------------------------------- build facts
def test_build_info_reports_the_build():
    info = _shim.build_info()
    assert info["compiler"].split()[0] in ("gcc", "clang") and info["cplusplus"] >= 201703
    assert "-std=c++" in info["flags"]
    assert info["platform"] in ("linux", "macos", "other")
    metal = info["metal"]
    assert isinstance(metal["preload"], bool)
    if not metal["preload"]:
        assert metal["reason"]  # says why (not macOS, or no MLX C++ SDK at build time)
    else:
        assert metal["mlx_headers"] == mx.__version__


def test_build_facts_and_manifest_together():
    """Archs and source hashes come from the manifest (Python side), build flags from the shim."""
    try:
        m = manifest.load()
    except manifest.KernelArtifactError as e:
        pytest.skip(f"no kernel manifest in this install: {e}")
    for row in m["variants"]:
        assert len(row["source_sha256"]) == 64 and row["sha256"]


# ---------------------------------------------------------------- CUDA driver, opened at run time
def test_cuda_device_facts_never_raise():
    facts = _shim.cuda_device_facts()
    if facts["available"]:
        for key in ("name", "sm_count", "l2_cache_bytes", "max_shared_memory_per_block_optin", "memory_bytes"):
            assert facts[key] not in (None, -1, ""), key
        assert facts["sm_count"] > 0 and len(facts["compute_capability"]) == 2
    else:
        assert "libcuda" in facts["reason"] or "cuInit" in facts["reason"] or "device" in facts["reason"]
    bad = _shim.cuda_device_facts(device=10_000)
    assert bad["available"] is False and bad["reason"]


def test_cuda_check_cubin_without_driver_says_why():
    if DRIVER["available"]:
        pytest.skip("a CUDA driver is present: the real checks below run instead")
    r = _shim.cuda_check_cubin(b"not a cubin", "k")
    assert r["ok"] is False and r["available"] is False and "libcuda" in r["reason"]


@pytest.mark.gpu  # the device script's `pytest -m gpu` runs it where a driver exists
@needs_driver
def test_cuda_check_cubin_rejects_garbage():
    r = _shim.cuda_check_cubin(b"\x7fELF garbage", "nope")
    assert r["ok"] is False and "cuModuleLoadData" in r["error"]


@pytest.mark.gpu  # the device script's `pytest -m gpu` runs it where a driver exists
@needs_driver
def test_cuda_check_cubin_loads_shipped_kernels():
    """Every shipped variant loads for this GPU (its cubin, or the PTX where none matches)."""
    rows = [v for v in manifest.variants("cuda")]
    if not rows:
        pytest.skip("no CUDA kernels shipped in this install")
    arch = DRIVER["arch"]
    checked = 0
    for v in rows:
        tag = arch if arch in v.row["files"] else "ptx"
        if tag not in v.row["files"]:  # an arch_exact variant (sm_90a) built for another GPU
            assert v.row.get("arch_exact"), f"{v.name} ships neither {arch} nor PTX"
            checked += 1
            continue
        r = _shim.cuda_check_cubin(v.read(tag), v.name)
        assert r["ok"], f"{v.name} ({tag}): {r.get('error')}"
        threads = cuda.block_threads(v.row["source"], v.row["dtype"])  # the largest CTA its launchers ask for
        assert r["registers"] > 0 and r["max_threads_per_block"] >= threads, (v.name, r["max_threads_per_block"], threads)
        missing = _shim.cuda_check_cubin(v.read(tag), v.name + "_not_there")
        assert missing["ok"] is False and "cuModuleGetFunction" in missing["error"]
        checked += 1
    assert checked == len(rows)


def test_block_threads_name_shipped_sources():
    """cuda.BLOCK_THREADS (the largest CTA a source is launched with; the cubin check above holds every
    shipped cubin to it) names kernel sources that exist, with the sizes the launchers pass: a renamed
    source would drop its entry, and its launches would then fail `_launch`'s check."""
    assert all((ROOT / "cuda_src" / f"{k}.cu").is_file() for k in cuda.BLOCK_THREADS), sorted(cuda.BLOCK_THREADS)
    assert cuda.block_threads("mhc_dynamic_coeffs_pre") == cuda_dynamic.CP_BLOCK == 512
    assert cuda.block_threads("mhc_forward_fused") == cuda.THREADS  # not in the table: THREADS
    # per dtype where the kernel's launch bounds differ: float32 resident tokens take 512 threads
    assert [cuda.block_threads("mhc_forward_resident", t) for t in ("f32", "f16", "bf16")] == [512, 256, 256]
    assert cuda.block_threads("mhc_forward_resident") == 512
    with pytest.raises(AssertionError, match=r"mhc_forward_fused \(bf16\) launched with 512 threads"):
        cuda._launch("mhc_forward_fused", "bf16", 4, [], [], [], [], (512, 1, 1), threads=512)


@pytest.mark.gpu  # the device script's `pytest -m gpu` runs it where a driver exists
@needs_driver
def test_launchers_size_work_by_the_driver_facts():
    """The dispatcher's device facts (grid sizes, shared-memory limits) are the driver's."""
    from mhc_aot import device

    assert device.sm_count() == DRIVER["sm_count"]
    assert device.max_shared_memory_per_block() == DRIVER["max_shared_memory_per_block_optin"]


# ---------------------------------------------------------------- NVTX ranges (mhc profile)
def test_nvtx_reports_and_never_raises():
    from mhc_aot import device

    nv = _shim.build_info()["nvtx"]
    assert isinstance(nv["available"], bool) and (nv["available"] or "nvtx3" in nv["reason"])
    depth = _shim.nvtx_range_push("mhc/test")
    assert isinstance(depth, int) and isinstance(_shim.nvtx_range_pop(), int)
    if not nv["available"]:
        assert depth == -1
    with pytest.raises(KeyError):  # the range is popped on the way out of an exception too
        with device.nvtx_range("mhc/test"):
            raise KeyError("inside")


# ---------------------------------------------------------------- MLX's Metal custom-kernel key
# Pinned values of libc++'s std::hash<std::string> (64-bit), taken from libc++ 14 (clang++ -stdlib=libc++).
LIBCXX_HASHES = {
    b"": 11160318154034397263,
    b"a": 2603192927274642682,
    b"mhc-aot": 15676264688897210411,
    b"custom_kernel_mhc_forward_fused_f16_n4": 3194786867635068833,
    b"[[kernel]] void f(\n" * 20: 913207502151960997,
}


def test_libcxx_hash_pinned_values():
    for s, h in LIBCXX_HASHES.items():
        assert _shim.libcxx_string_hash(s) == h, s[:40]


def test_libcxx_hash_against_real_libcxx(tmp_path):
    clangxx = shutil.which("clang++")
    if clangxx is None:
        pytest.skip("clang++ not installed: checked against the pinned values only")
    prog = tmp_path / "h.cpp"
    prog.write_text('#include <functional>\n#include <fstream>\n#include <iostream>\n#include <sstream>\n#include <string>\n'
                    'int main(int c, char** v) { for (int i = 1; i < c; ++i) { std::ifstream f(v[i], std::ios::binary);'
                    ' std::stringstream s; s << f.rdbuf(); std::cout << std::hash<std::string>{}(s.str()) << "\\n"; } }\n')
    exe = tmp_path / "h"
    built = subprocess.run([clangxx, "-stdlib=libc++", "-std=c++17", str(prog), "-o", str(exe)], capture_output=True,
                           text=True)
    if built.returncode != 0:
        pytest.skip(f"libc++ not installed (apt-get install libc++-dev libc++abi-dev): {built.stderr[-200:]}")
    import random

    rng = random.Random(5)
    samples = [bytes(rng.randrange(256) for _ in range(n)) for n in [*range(0, 130), 255, 1000, 4097]]
    files = []
    for i, data in enumerate(samples):
        f = tmp_path / f"s{i}.bin"
        f.write_bytes(data)
        files.append(str(f))
    out = subprocess.run([str(exe), *files], capture_output=True, text=True, check=True).stdout.split()
    assert [int(h) for h in out] == [_shim.libcxx_string_hash(s) for s in samples]


def test_metal_kernel_key_format():
    k = _shim.metal_kernel_key("demo", [("x", "float16_t", 16, 2), ("p", "int32_t", 8, 1)], [("out", "float")],
                               "\n// body\n")
    assert k["kernel_name"] == "custom_kernel_demo_float16_t_int32_t_float"
    assert k["library_name"] == f"{k['kernel_name']}_{k['source_hash']:x}_0"
    assert k["source"].startswith("[[kernel]] void custom_kernel_demo_float16_t_int32_t_float(\n")
    assert "const device float16_t* x [[buffer(0)]]" in k["source"] and "device float* out [[buffer(2)]]" in k["source"]
    if sys.platform != "darwin":
        assert k["source_hash"] == _shim.libcxx_string_hash(k["source"].encode())
    small = _shim.metal_kernel_key("demo", [("x", "float", 4, 1), ("s", "float", 1, 0)], [("o", "float")], "")
    assert small["kernel_name"] == "custom_kernel_demo_floatc_floats_float"
    assert "const constant float* x" in small["source"] and "const constant float& s" in small["source"]


def test_metal_kernel_key_with_mlx_imported_first(tmp_path):
    """In a child process that imports MLX and runs an op on its default device first (on a GPU
    machine, MLX's CUDA build), the key equals this process's; the shim once crashed the interpreter
    there (H200, session 25: formatting through libstdc++ streams), which a child process reports as
    a failure instead of ending the test session."""
    args = ("demo", [("x", "float16_t", 16, 2), ("p", "int32_t", 8, 1)], [("out", "float")], "\n// body\n")
    code = ("import mlx.core as mx; mx.eval(mx.ones((4,)) + 1); from mhc_aot import _shim; "
            f"print(_shim.metal_kernel_key(*{args!r})['library_name'])")
    # the child imports the mhc_aot this process tests (not a source tree's, whose _shim/ folder of
    # sources would import as an empty namespace package), run from a folder of its own
    env = {**os.environ, "PYTHONPATH": str(Path(mhc_aot.__file__).resolve().parent.parent)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == [_shim.metal_kernel_key(*args)["library_name"]]


def test_source_tree_without_build_outputs_says_so(tmp_path):
    """The package's Python files next to an uncompiled `_shim/` folder of sources (what Python run from
    the repo root after a non-editable install imports): the shim is refused by name, with the way
    out, where it used to import as an empty namespace package and fail on a missing attribute."""
    tree = tmp_path / "mhc_aot"
    (tree / "_shim").mkdir(parents=True)
    for f in Path(mhc_aot.__file__).resolve().parent.glob("*.py"):
        (tree / f.name).write_text(f.read_text())
    code = ("from mhc_aot import device\n"
            "try:\n    device.load_shim()\nexcept ImportError as e:\n    print('refused:', e)\n"
            "print('facts:', device.cuda_facts()['reason'])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("refused: mhc_aot was imported from a source tree without its build outputs"), lines
    assert "pip install -e ." in lines[0] and str(tree / "_shim") in lines[0]
    assert lines[1].startswith("facts: mhc_aot._shim not importable: mhc_aot was imported from a source tree"), lines


def _mlx_source(name, inputs, outputs, body):
    """MLX's own generated source for a metal_kernel call (verbose printout, export tracing)."""
    from mhc_aot import metal as mm

    row = {"name": name, "abi": {"inputs": [list(i[:2]) for i in inputs], "outputs": [list(o) for o in outputs]}}
    saved = mm.stub_body
    mm.stub_body = lambda _name: body
    try:
        return mm.mlx_generated_source(row)
    finally:
        mm.stub_body = saved


def test_linux_check_key_source_equals_mlx_generated_source_for_every_metal_variant():
    """LINUX CHECK: the shim's replica of MLX's signature writer matches MLX 0.32.4 exactly, for
    every Metal variant's buffers and the launcher's placeholder body (so the hash, the key, and
    the function name agree)."""
    from build_tools import metal as bm
    from build_tools.variants import VARIANTS

    from mhc_aot import metal as mm

    checked = 0
    for v in VARIANTS:
        if not (bm.SRC / f"{v.source}.metal").exists():
            continue
        row = {**v.row(), "abi": bm.manifest_abi(v, bm.parse_abi(v.source))}
        key = mm.kernel_key(row)
        assert key["kernel_name"] == row["abi"]["function"] == bm.entry_name(v), v.name
        assert key["source"] == mm.mlx_generated_source(row), v.name
        assert not key["uses_shape_buffers_or_attributes"]
        checked += 1
    assert checked >= 70


def test_linux_check_key_follows_mlx_for_shape_buffers_and_attributes():
    """The replica also follows MLX where mhc-aot does not go: shape/stride buffers, thread
    attributes and small (constant-space) inputs."""
    inputs = [("a", "float", 16, 1), ("b", "float", 16, 1)]
    outputs = [("out", "float"), ("o2", "float")]
    body = "\nuint i = thread_position_in_grid.x; int k = a_shape[0] + b_strides[0]; (void)simd_lane;\n"
    key = _shim.metal_kernel_key("edge", inputs, outputs, body)
    assert key["source"] == _mlx_source("edge", inputs, outputs, body)
    assert key["uses_shape_buffers_or_attributes"]


def test_metal_preload_off_macos_is_unavailable():
    r = _shim.metal_preload("/nonexistent/mhc_aot.metallib", "lib", "fn", ["x"], 256)
    if _shim.build_info()["metal"]["preload"]:
        pytest.skip("this shim has the Metal preload (macOS): exercised by the Metal backend tests")
    assert r["available"] is False and "Metal" in r["reason"]


def test_metal_backend_refuses_clearly_without_preload():
    from mhc_aot import metal as mm

    if _shim.build_info()["metal"]["preload"]:
        pytest.skip("this shim has the Metal preload")
    mm._check_shim.cache_clear()
    with pytest.raises(mm.MetalPreloadError, match="no Metal kernel preload"):
        mm._check_shim()
