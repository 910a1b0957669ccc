"""The Metal kernels of metal_src/ run on the CPU for tests without Apple hardware: each variant is
compiled with g++ against metal_src/check/emulate/metal_stdlib (threads of a threadgroup are
fibers, threadgroup barriers and simdgroup reductions emulated) and launched by a stand-in
for the preloaded mx.fast.metal_kernel that binds buffers in MLX's order. It proves the algorithm,
the indexing and the launch geometry, NOT the Metal compiler, the preload into MLX, GPU memory
ordering or timing. Used by test_metal_sources.py and test_dynamic.py.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # build_tools is not installed; appended so the installed mhc_aot still wins

from build_tools import metal as bm  # noqa: E402
from build_tools.variants import VARIANTS  # noqa: E402

_NP = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
_NAN_BITS = {"bfloat16": 0x7FC0}


class EmulatedKernel:
    """Stands in for mhc_aot.metal._Kernel: same name/nmax/abi, `kernel` runs the emulation."""

    def __init__(self, v, cache, launched: list):
        self.name, self.nmax = v.name, v.nmax
        self.abi = bm.manifest_abi(v, bm.parse_abi(v.source))
        self.max_threads = self.abi["threads"]
        self.emulated = bm.Emulated(v, cache)
        self.kernel = self
        self.launched = launched  # every launch's variant name, in order (shared by all kernels)

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, init_value=None):
        assert threadgroup[1] == threadgroup[2] == 1
        assert all(a.size >= bm.SCALAR_SLOTS for a in inputs), "MLX would bind a smaller input as constant"
        ins = [np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)) for a in inputs]
        outs = []
        for shape, dt in zip(output_shapes, output_dtypes):
            name = str(dt).split(".")[-1]
            o = np.empty(shape, _NP[name])
            o.fill(_NAN_BITS.get(name, np.nan))  # poisoned: an element the kernel does not write stays NaN
            outs.append(o)
        self.emulated.run(ins + outs, grid, threadgroup[0])
        self.launched.append(self.name)
        return [mx.array(o).view(mx.bfloat16) if dt == mx.bfloat16 else mx.array(o)
                for o, dt in zip(outs, output_dtypes)]


CACHE = Path(tempfile.gettempdir()) / "mhc-aot-metal-emulation"  # one build per variant for every test file


def emulations(cache: Path = CACHE):
    """get(source, dtype, n) -> EmulatedKernel, manifest.find's rule over the variant table instead
    of shipped files (built on first use, cached in `cache`); get.launched lists the launches."""
    if shutil.which("g++") is None:
        pytest.skip("the CPU emulation of the Metal kernels needs g++ (C++20)")
    built: dict = {}
    launched: list[str] = []

    def get(source, dtype, n):
        cands = [v for v in VARIANTS if v.source == source and v.dtype == dtype]
        fitting = sorted((v for v in cands if n is not None and v.nmax >= n), key=lambda v: v.nmax)
        v = (fitting[:1] or [v for v in cands if v.nmax == 0])[0]
        if v.name not in built:
            built[v.name] = EmulatedKernel(v, cache, launched)
        return built[v.name]

    get.launched = launched
    return get


def patch(monkeypatch, get):
    """mhc_aot.metal launches the emulated kernels, on a machine that says it has Metal."""
    from mhc_aot import kernel_ops
    from mhc_aot import metal as mm

    monkeypatch.setattr(mm, "_kernel", get)
    monkeypatch.setattr(kernel_ops, "COMPILE_FORWARD", False)  # numpy stand-in kernels cannot be traced
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    return mm
