"""The CUDA kernels of cuda_src/ run on the CPU for tests without a GPU: each is compiled with g++
against cuda_src/mhc_dynamic_emulate.h (threads of a CTA are fibers, __syncthreads a barrier,
shuffles go through a per-warp buffer, cp.async a plain copy) and launched by a stand-in for
mx.fast.precompiled_cuda_kernel with the arguments that mhc_aot's launchers pass. It proves the
algorithm, the indexing and the launch geometry, not GPU timing, memory ordering or register
limits: the GPU tests (marked gpu) do that on the device. Used by test_dynamic.py and
test_mhc_forward.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
CUDA_SRC = ROOT / "cuda_src"
FIBER = ROOT / "tests" / "emu_fiber.h"  # the fibers of both emulations (mhc_dynamic_emulate.h includes it)
# uint32: mhc_dynamic_phi_split's packed bfloat16 pairs, poisoned as two bfloat16 NaNs
EMU_NP = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.uint32: np.uint32}
EMU_NAN = {mx.float32: np.float32(np.nan), mx.float16: np.float16(np.nan), mx.bfloat16: np.uint16(0x7FC0),
           mx.uint32: np.uint32(0x7FC07FC0)}


def tensor_map(dtype, dims, strides, box, swizzle) -> bytes:
    """mhc_aot.tma.encode's stand-in: the emulated map of mhc_dynamic_emulate.h (mhc::tma::EmuMap; its
    address written by the kernel), checked as cuTensorMapEncodeTiled checks it."""
    import struct

    elem = {"bf16": 2, "f16": 2, "f32": 4}[dtype]
    rank = len(dims)
    assert rank <= 5 and len(strides) == rank - 1 and len(box) == rank
    assert all(s % 16 == 0 for s in strides), f"TMA strides are multiples of 16 bytes: {strides}"
    assert all(1 <= b <= 256 for b in box) and box[0] * elem % 16 == 0, f"box {box}"
    assert swizzle in (0, 128) and (swizzle == 0 or box[0] * elem <= swizzle), (swizzle, box)
    pad5 = lambda v, fill=0: list(v) + [fill] * (5 - len(v))  # noqa: E731
    return struct.pack("<Q3I5I5Q5I6II", 0, rank, swizzle, elem, *pad5(dims), *pad5([0, *strides]),
                       *pad5(box), *[0] * 6, 0x54554D45)


class Emulator:
    def __init__(self, cache):
        import importlib.util

        spec = importlib.util.spec_from_file_location("_mhc_variants_for_emulation",
                                                      ROOT / "build_tools" / "variants.py")
        self.variants = importlib.util.module_from_spec(spec)
        __import__("sys").modules[spec.name] = self.variants  # dataclasses look their module up
        spec.loader.exec_module(self.variants)
        self.by_name = {v.name: v for v in self.variants.VARIANTS}
        self.cache = cache
        self.libs = {}
        self.launched, self.grids = [], []  # (entry name, scalars) and the grid of every launch
        self.deferred_copies = False  # True: cp.async copies land at their wait (mhc_dynamic_emulate.h)
        self.shuffle_seed = None  # an int: threads resumed in a pseudo-random order each round (MHC_EMU_SHUFFLE)
        self.extra_defines = ()  # a test's defines (NAME=VALUE) for every kernel it builds
        self.u32_poison = {}  # kernel source -> the value its uint32 outputs start as (default EMU_NAN's)
        self.misaligned = {}  # kernel source -> indices of inputs placed one element past a 16-byte boundary
        # kernel source -> its last launch's inputs as the kernel left them (a GPU kernel may write an input in
        # place, as mhc_dynamic_coeffs_pre counts on its counters; here inputs are copies)
        self.inputs_after = {}

    def binary(self, source, dtype, n, units=1, terms=3):  # mhc_aot.cuda._binary's lookup rule, without shipped files
        cands = [v for v in self.variants.VARIANTS if v.source == source and v.dtype == dtype and v.units == units
                 and v.terms == terms]
        fitting = sorted((v for v in cands if n is not None and v.nmax >= n), key=lambda v: v.nmax)
        v = (fitting[:1] or [v for v in cands if v.nmax == 0])[0]
        return v.name, b"", v.nmax

    def build(self, source, dtype, nmax, deferred=False, defines=()):
        import ctypes
        import hashlib
        import re
        import subprocess

        text = (CUDA_SRC / f"{source}.cu").read_text()
        sig = re.search(r"MHC_NAME\((.*?)\)\s*\{", text, re.S).group(1)
        types = []
        for p in (q.strip() for q in sig.split(",")):
            name = re.findall(r"[A-Za-z_]\w*", p)[-1]
            types.append(p[: p.rindex(name)].replace("__restrict__", "").strip())
        args = [f"({t})ptrs[{i}]" if "*" in t else f"({t})scal[{i}]" for i, t in enumerate(types)]
        # a cluster kernel names its size CLUSTER; a persistent grid whose CTAs wait on each other
        # (MHC_GRID_RESIDENT) runs all its CTAs together, as one cluster of the whole grid
        cluster = ("CLUSTER" if "__cluster_dims__(CLUSTER" in text else
                   "gx" if "#define MHC_GRID_RESIDENT" in text else "1")
        body = text.replace("extern __shared__ float smem[];", "float* smem = emu_dyn_smem;") + (
            '\nextern "C" void emu_run(void** ptrs, const double* scal, int gx, int gy, int gz, int threads, '
            'long smem) {\n'
            f"  emu_launch(gx, gy, gz, threads, (size_t)smem, {cluster}, [&] {{ MHC_NAME({', '.join(args)}); }});\n}}\n")
        deps = "".join(h.read_text() for h in sorted([*CUDA_SRC.glob("*.cuh"), CUDA_SRC / "mhc_dynamic_emulate.h", FIBER]))
        key = hashlib.sha256(f"{body}{deps}{dtype}{nmax}{deferred}{defines}".encode()).hexdigest()[:16]
        so = self.cache / f"{source}_{dtype}_{nmax}{'_deferred' if deferred else ''}_{key}.so"
        if not so.exists():
            inc = self.cache / "inc"
            inc.mkdir(parents=True, exist_ok=True)
            for h in ("cuda_bf16.h", "cuda_fp16.h", "mma.h", "cuda_pipeline.h"):  # the emulation header defines what these would
                (inc / h).write_text("#pragma once\n")
            cpp = so.with_suffix(f".{__import__('os').getpid()}.cpp")
            cpp.write_text(body)
            tmp = so.with_suffix(f".{__import__('os').getpid()}.tmp")
            cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-I", str(inc), "-I", str(CUDA_SRC), "-I", str(FIBER.parent),
                   "-include", str(CUDA_SRC / "mhc_dynamic_emulate.h"), "-DMHC_NAME=emu_kernel",
                   f"-DMHC_DTYPE={dtype}", f"-DMHC_NMAX={nmax}", *(["-DMHC_EMU_DEFERRED_COPIES"] if deferred else []),
                   *[f"-D{d}" for d in defines],
                   str(cpp), "-o", str(tmp)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"emulation build of {source} failed:\n{r.stderr[-3000:]}")
            tmp.replace(so)
        lib = ctypes.CDLL(str(so))
        lib.emu_run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_double),
                                *[ctypes.c_int] * 4, ctypes.c_long]
        return lib, len(types)

    def lib(self, name):
        v = self.by_name[name]
        # the variant's own defines beyond name, dtype and NMAX (the forward ring's MHC_RING_UNITS)
        own = tuple(f"{k}={val}" for k, val in v.defines().items() if k not in ("MHC_NAME", "MHC_DTYPE", "MHC_NMAX"))
        if self.shuffle_seed is not None:
            own += (f"MHC_EMU_SHUFFLE={self.shuffle_seed}",)
        own += tuple(self.extra_defines)
        key = (v.source, v.dtype or "f32", v.nmax, self.deferred_copies, own)
        if key not in self.libs:
            self.libs[key] = self.build(*key)
        return self.libs[key]

    def kernel(self, *, name, compiled_source, inputs, output_shapes, output_dtypes, scalars, grid, threadgroup,
               shared_memory=0, init_value=None, ensure_row_contiguous=False, stream=None):
        import ctypes

        lib, nparams = self.lib(name)
        self.launched.append((name, list(scalars)))
        self.grids.append(tuple(grid))
        ins = [np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)) for a in inputs]
        for k in self.misaligned.get(self.by_name[name].source, ()):  # (an input that is a view at an offset)
            buf = np.empty(ins[k].nbytes + 32, np.uint8)
            off = -buf.ctypes.data % 16 + ins[k].itemsize
            view = buf[off:off + ins[k].nbytes].view(ins[k].dtype).reshape(ins[k].shape)
            view[...] = ins[k]
            ins[k] = view
        outs = []
        poison = dict(EMU_NAN)
        if self.by_name[name].source in self.u32_poison:
            poison[mx.uint32] = np.uint32(self.u32_poison[self.by_name[name].source])
        for shape, dt in zip(output_shapes, output_dtypes):
            o = np.empty(shape, EMU_NP[dt])
            o.fill(poison[dt])  # poisoned whatever init_value says: an unwritten element shows as NaN (or a test's uint32 value)
            outs.append(o)
        arrays = ins + outs
        assert len(arrays) + len(scalars) == nparams, f"{name}: {len(arrays)} arrays + {len(scalars)} scalars"
        assert threadgroup[1] == threadgroup[2] == 1
        ptrs = (ctypes.c_void_p * nparams)(*[a.ctypes.data for a in arrays], *[0] * len(scalars))
        scal = (ctypes.c_double * nparams)(*[0.0] * len(arrays), *[float(s) for s in scalars])
        # MLX launches ceil(grid / threadgroup) CTAs (mhc_backward_reduce's grid is its column count)
        lib.emu_run(ptrs, scal, -(-grid[0] // threadgroup[0]), grid[1], grid[2], threadgroup[0], int(shared_memory))
        self.inputs_after[self.by_name[name].source] = ins
        return [mx.array(o).view(mx.bfloat16) if dt == mx.bfloat16 else mx.array(o)
                for o, dt in zip(outs, output_dtypes)]
