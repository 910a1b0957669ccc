"""Suite-wide setup: test the installed mhc_aot, and say which one in the report header.

`python -m pytest` puts the current directory on sys.path. Run from the repo root, the source
tree's `mhc_aot/` would then shadow the installed package, whose compiled kernels, manifest and
shim the source tree lacks. So the repo root is dropped from sys.path whenever an installed
mhc_aot can be found without it (an editable install maps back to the source tree anyway).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == ROOT
    except OSError:
        return False


def _prefer_installed_package() -> None:
    if "mhc_aot" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not _is_root(p)]
    if importlib.util.find_spec("mhc_aot") is None:
        sys.path[:] = saved  # not installed: the source tree is all there is


_prefer_installed_package()

# MLX computes float32 matmuls in TF32 on CUDA (and Apple's newest GPUs) unless MLX_ENABLE_TF32=0 is set
# before its first matmul; MLX's own test harness and `mhc validate` pin it, and so do these tests: a
# float32 check tests float32 arithmetic. With MLX's default on a GPU the portable path (MLX ops, a
# matmul for the mix and the projection) lands ~1e-4 off float64 (H200, session 26: 103 portable and
# emulated float32 tests failed). The kernels do not depend on it: test_layer.py and test_dynamic.py run
# their float32 GPU checks again in a child process with it on. An explicit setting wins.
TF32_ENV = "MLX_ENABLE_TF32"
os.environ.setdefault(TF32_ENV, "0")


def pytest_report_header(config):
    import mlx.core as mx

    import mhc_aot

    gpus = [name for name, ok in (("cuda", mx.cuda.is_available()), ("metal", mx.metal.is_available())) if ok]
    return [f"mhc_aot {mhc_aot.__version__} from {Path(mhc_aot.__file__).parent}",
            f"mlx {mx.__version__}, default device {mx.default_device()}, GPU backends: {', '.join(gpus) or 'none'}, "
            f"{TF32_ENV}={os.environ[TF32_ENV]}",
            # dispatch differs with MLX's CUDA graphs off (`cluster` runs only then): say which mode ran
            f"MLX_USE_CUDA_GRAPHS={os.environ.get('MLX_USE_CUDA_GRAPHS', 'unset (on)')}"]


# ---------------------------------------------------------------- CUDA kernels, emulated on the CPU
# mhc_aot.cuda's launchers with mx.fast.precompiled_cuda_kernel replaced by tests/cuda_emulation.py
# (each kernel compiled with g++, CTAs run as fibers): for test_mhc_forward.py and test_sinkhorn.py
# (test_dynamic.py has its own, with per-mode knobs).

@pytest.fixture(scope="module")
def _cuda_emulator():
    import shutil
    import tempfile
    from pathlib import Path

    from cuda_emulation import ROOT, Emulator

    if shutil.which("g++") is None or not (ROOT / "build_tools" / "variants.py").exists():
        pytest.skip("CUDA emulation needs g++ (C++20, ucontext) and the source tree (cuda_src/, build_tools/)")
    return Emulator(Path(tempfile.gettempdir()) / "mhc-aot-cuda-emulation")


@pytest.fixture
def emulated_cuda(_cuda_emulator, monkeypatch):
    import mlx.core as mx

    from mhc_aot import cuda, device, kernel_ops

    monkeypatch.setattr(cuda, "_binary", _cuda_emulator.binary)
    monkeypatch.setattr(mx.fast, "precompiled_cuda_kernel", _cuda_emulator.kernel)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernel_ops, "COMPILE_FORWARD", False)  # numpy stand-in kernels cannot be traced
    monkeypatch.setattr(device, "max_shared_memory_per_block", lambda: cuda.SMEM_LIMIT)
    _cuda_emulator.launched, _cuda_emulator.grids = [], []
    _cuda_emulator.deferred_copies = False  # copies land at issue unless a test asks otherwise
    _cuda_emulator.shuffle_seed = None  # threads in order unless a test asks otherwise
    _cuda_emulator.extra_defines = ()  # the shipped sources' defaults unless a test asks otherwise
    _cuda_emulator.u32_poison = {}
    _cuda_emulator.misaligned = {}
    return _cuda_emulator


@pytest.fixture(params=["copies_at_issue", "copies_at_wait"])
def copy_timing(request, emulated_cuda):
    """Runs a cp.async kernel's emulated test twice: copies landing at issue (shows a slot refilled
    while still read) and at the wait that retires them (shows a read before its wait + barrier)."""
    emulated_cuda.deferred_copies = request.param == "copies_at_wait"
    return request.param
