"""metal_src/ checked on Linux in CI (no Apple hardware, no Metal compiler): a syntax-and-type
check of every variant, and the Metal kernels' interfaces against the CUDA kernels, the
KernelVariant table and the build pipeline's dry run: compiler and text checks of the sources. The
static layer's kernels also RUN here under the CPU emulation of tests/metal_emulation.py (last
section; the dynamic layer's in test_dynamic.py); no Metal compiler or GPU is involved.

Shape table: none (no numerics). What is checked, per variant of build_tools/variants.py whose
source has a .metal twin: the LINUX SYNTAX-AND-TYPE CHECK (clang, C++ for OpenCL, against the
stand-in metal_src/check/metal_stdlib, with the variant's -D macros); its buffer arguments
against the CUDA signature; its command in `python -m build_tools.metal --dry-run`.
Tolerance table: none. Reference: cuda_src/ (kernel names, argument lists, shared constants).
Deliberately broken samples (made from the real sources in a temp dir) must FAIL the check: a
typo, a misspelt attribute, wrong address spaces (kernel scope, helper parameter, header).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import metal_emulation
import mlx.core as mx
import pytest
from backends import (forward64, grads64, mix_add64, random_M, rel_error64, run_forward, seed_of, sinkhorn64,
                      value64)

from mhc_aot import dispatch, ops, testing

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # build_tools is not installed; appended so the installed mhc_aot still wins

from build_tools import metal as bm  # noqa: E402
from build_tools.variants import VARIANTS  # noqa: E402

CUDA = ROOT / "cuda_src"
METAL = ROOT / "metal_src"
needs_clang = pytest.mark.skipif(bm.find_clang() is None,
                                 reason="clang not installed (apt-get install -y --no-install-recommends clang)")

# CUDA kernels of the dynamic layer (issue 6) without a Metal twin yet: the GEMM-like kernels of the
# coefficients (on Metal the projection, dx and dphi are MLX matmuls, db and dalpha MLX sums), and
# the CUDA-only tensor-core and one-read kernels with their header. Ported: mhc_dynamic_coeffs and
# mhc_dynamic_coeffs_bwd (their CTA-per-token mode), mhc_dynamic_pre, mhc_dynamic_post_res and the
# latter two's backward kernels. Any other CUDA kernel or header without a Metal twin fails
# test_every_cuda_kernel_has_a_metal_twin / test_headers_are_parallel.
PENDING_DYNAMIC = ("mhc_dynamic_skinny", "mhc_dynamic_dx",
                   "mhc_dynamic_colsum", "mhc_dynamic_phi_split", "mhc_dynamic_proj_tc", "mhc_dynamic_dphi_tc",
                   "mhc_dynamic_coeffs_pre", "mhc_dynamic_coeffs_proj", "mhc_dynamic_proj_cluster")
# mhc_tma.cuh: Hopper's TMA (sm_90a), used by mhc_dynamic_coeffs_pre and _proj_cluster only; a Metal port of those
# would stream its tiles otherwise. mhc_dynamic_coeffs.cuh: the per-token math that the CUDA kernels
# mhc_dynamic_coeffs and mhc_dynamic_coeffs_proj share; metal_src/mhc_dynamic_coeffs.metal holds its
# own copy until a Metal twin of the second kernel needs it shared
PENDING_HEADERS = ("mhc_dynamic_mma", "mhc_tma", "mhc_dynamic_coeffs")
# The static layer's `resident`, `cluster` and `ring` kernels (forward and backward) (CUDA only by dispatch rule: dispatch._gpu_rules
# adds them for CUDA alone; Metal serves those shapes with `fused`) and the tensor-core dM of the
# backward (cuda._dm_partials; Metal's backward takes mhc_backward_dm): not yet ported either.
PENDING_METAL_PORT = PENDING_DYNAMIC + ("mhc_forward_resident", "mhc_backward_resident", "mhc_forward_cluster",
                                       "mhc_forward_ring", "mhc_backward_dm_tc", "mhc_backward_ring")


def _sources() -> list[str]:
    return list(dict.fromkeys(v.source for v in VARIANTS))


def _ported() -> list[str]:
    return [s for s in _sources() if (METAL / f"{s}.metal").exists()]


def _variant(source: str, dtype: str | None = "f16", nmax: int | None = None):
    for v in VARIANTS:
        if v.source == source and (v.dtype == dtype or v.dtype is None) and (nmax is None or v.nmax == nmax):
            return v
    raise LookupError(source)


# ---------------------------------------------------------------- the Linux check itself
@needs_clang
def test_linux_syntax_and_type_check_of_every_metal_variant():
    """LINUX CI CHECK (clang against the stand-in header, not a Metal build): every variant."""
    failures = bm.check_all(log=lambda *_: None)
    assert not failures, "\n".join(f"--- {v.name}\n{out}" for v, out in failures)


def _mutated(tmp_path: Path, source_file: str, old: str, new: str) -> Path:
    """A copy of metal_src (headers and all) in tmp_path with one edit in one file."""
    dst = tmp_path / "metal_src"
    shutil.copytree(METAL, dst, ignore=shutil.ignore_patterns("check"))
    f = dst / source_file
    text = f.read_text()
    assert text.count(old) >= 1, f"sample edit not applicable: {old!r} not in {source_file}"
    f.write_text(text.replace(old, new, 1))
    return dst


BROKEN = {
    # name: (file edited, variant's source, old text, new text, what the compiler must say)
    "typo_in_intrinsic": ("mhc_forward_fused.metal", "mhc_forward_fused",
                          "threadgroup_barrier(mem_flags::mem_threadgroup);\n  const uint b",
                          "threadgroup_barier(mem_flags::mem_threadgroup);\n  const uint b", "undeclared identifier"),
    "typo_in_variable": ("mhc_stream_mix_add.metal", "mhc_stream_mix_add", "mix_add_tile<VEC>(x + off, bias + off",
                         "mix_add_tile<VEC>(x + off, bais + off", "undeclared identifier"),
    "misspelt_attribute": ("mhc_sinkhorn_fwd.metal", "mhc_sinkhorn_fwd", "[[thread_index_in_simdgroup]]",
                           "[[thread_index_in_simd_group]]", "unknown attribute"),
    # a threadgroup array declared in the thread address space, passed where threadgroup is expected
    "address_space_kernel_scope": ("mhc_forward_fused.metal", "mhc_forward_fused",
                                   "threadgroup float hpost[PADCAP];", "float hpost[PADCAP];",
                                   "from '__private float[2]' to '__local float"),
    # a helper declared to take device memory, called with a threadgroup array
    "address_space_helper_parameter": ("mhc_common.h", "mhc_forward_column_rms",
                                       "inline float block_sum(float v, threadgroup float* scratch, Tid t)",
                                       "inline float block_sum(float v, device float* scratch, Tid t)",
                                       "from '__local float[8]' to '__global float"),
    # device output written through a pointer the helper declares threadgroup
    "address_space_device_vs_threadgroup": ("mhc_sinkhorn_common.h", "mhc_sinkhorn_bwd",
                                            "inline void normalize_rows(Ptr P, int n, float eps, device float* sums",
                                            "inline void normalize_rows(Ptr P, int n, float eps, threadgroup float* sums",
                                            "cannot pass pointer to address space '__global' as a pointer to address space '__local'"),
    # a write into the constant address space (the scalars buffer)
    "address_space_constant": ("mhc_backward_reduce.metal", "mhc_backward_reduce",
                               "  const int P = n * n + 2 * n + C;", "  s.G = 0;\n  const int P = n * n + 2 * n + C;",
                               "read-only variable is not assignable"),
}


@needs_clang
@pytest.mark.parametrize("sample", sorted(BROKEN))
def test_linux_check_fails_on_deliberately_broken_sample(tmp_path, sample):
    """LINUX CI CHECK: a typo or a wrong address space in a .metal file (or header) fails it."""
    file, source, old, new, message = BROKEN[sample]
    v = _variant(source, "f16", None) if source != "mhc_backward_reduce" else _variant(source, None)
    ok, _ = bm.check_variant(v)
    assert ok, f"the unedited {source} must pass for this sample to mean anything"
    broken = _mutated(tmp_path, file, old, new)
    ok, out = bm.check_variant(v, broken / f"{source}.metal")
    assert not ok, f"broken sample {sample} passed the check:\n{out}"
    assert message in out, out


@needs_clang
def test_linux_check_fails_on_metal_only_rule(tmp_path):
    """LINUX CI CHECK: Metal has no lambdas; C++ does, so the lint catches them."""
    v = _variant("mhc_forward_fused", "f32", 4)
    broken = _mutated(tmp_path, "mhc_forward_fused.metal", "const Tid t{tid, lane, sg};",
                      "const Tid t{tid, lane, sg};\n  auto twice = [&](int q) { return 2 * q; };\n  (void)twice;")
    ok, out = bm.check_variant(v, broken / "mhc_forward_fused.metal")
    assert not ok and "lambda" in out, out


# ---------------------------------------------------------------- the two trees stay parallel
_CUDA_KERNEL = re.compile(r"extern\s+\"C\"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?MHC_NAME\s*\((?P<params>.*?)\)\s*\{",
                          re.S)


def cuda_signature(source: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(inputs, outputs, scalars) of cuda_src/<source>.cu as (name, element type) lists."""
    text = bm.strip_comments((CUDA / f"{source}.cu").read_text())
    m = _CUDA_KERNEL.search(text)
    assert m, f"cuda_src/{source}.cu: no extern \"C\" __global__ MHC_NAME(...)"
    ins, outs, scalars = [], [], []
    for raw in m.group("params").split(","):
        p = " ".join(raw.replace("__restrict__", "").split())
        ptr = re.fullmatch(r"(const )?(\w+) ?\* ?(\w+)", p)
        if ptr:
            (ins if ptr.group(1) else outs).append((ptr.group(3), ptr.group(2)))
            continue
        sc = re.fullmatch(r"(int|float) (\w+)", p)
        assert sc, f"cuda_src/{source}.cu: unreadable parameter {p!r}"
        scalars.append((sc.group(2), sc.group(1)))
    return ins, outs, scalars


def test_every_cuda_kernel_has_a_metal_twin():
    cuda = {s for s in _sources() if (CUDA / f"{s}.cu").exists()}
    missing = sorted(s for s in cuda if not (METAL / f"{s}.metal").exists())
    assert [s for s in missing if s not in PENDING_METAL_PORT] == [], \
        "CUDA kernels without a Metal twin"
    assert [s for s in PENDING_METAL_PORT if (METAL / f"{s}.metal").exists()] == [], "ported: take it off the list"
    assert not [p.name for p in METAL.glob("*.metal") if p.stem not in _sources()], "Metal kernels not in the table"


def test_headers_are_parallel():
    """cuda_src/X.cuh <-> metal_src/X.h, each Metal header naming its CUDA twin."""
    for h in CUDA.glob("*.cuh"):
        if h.stem in PENDING_HEADERS:
            continue
        twin = METAL / f"{h.stem}.h"
        assert twin.exists(), f"{h.name} has no metal_src/{twin.name}"
        assert f"cuda_src/{h.name}" in twin.read_text(), f"metal_src/{twin.name} should say it mirrors {h.name}"
    for src in _ported():
        assert f"cuda_src/{src}.cu" in (METAL / f"{src}.metal").read_text(), f"{src}.metal should name its CUDA twin"


@pytest.mark.parametrize("source", _ported())
def test_kernel_arguments_match_cuda(source):
    """Same inputs (names, element types, order), outputs, and scalars (as struct Scalars, after
    the inputs: mx.fast.metal_kernel has no scalar arguments)."""
    ins, outs, scalars = cuda_signature(source)
    abi = bm.parse_abi(source)
    m_ins = [(b.name, b.ctype) for b in abi.buffers if b.role == "input"]
    m_outs = [(b.name, b.ctype) for b in abi.outputs]
    assert m_ins == ins, f"{source}: Metal inputs {m_ins} != CUDA {ins}"
    assert m_outs == outs, f"{source}: Metal outputs {m_outs} != CUDA {outs}"
    assert [(n, t) for t, n in abi.scalars] == scalars, f"{source}: Metal Scalars {abi.scalars} != CUDA {scalars}"
    assert [b.role for b in abi.buffers].count("scalars") == (1 if scalars else 0)


def _constants(path: Path) -> dict[str, str]:
    text = bm.strip_comments(path.read_text())
    return dict(re.findall(r"(?:constant\s+)?constexpr\s+(?:int|bool)\s+(\w+)\s*=\s*([^;]+);", text))


def test_shared_constants_agree():
    """Launch geometry comes from one set of numbers: the CUDA headers, the Metal headers and both
    launchers (mhc_aot/cuda.py, mhc_aot/metal.py) agree on them."""
    cuda_c, metal_c = {}, {}
    for f in CUDA.glob("*.cu*"):
        cuda_c.update(_constants(f))
    for f in [*METAL.glob("*.h"), *METAL.glob("*.metal")]:
        metal_c.update(_constants(f))
    for name in ("THREADS", "IB", "TILE_C", "CHUNK", "SMALL_N", "SMALL_THREADS", "TILE"):
        if name in cuda_c:
            assert " ".join(cuda_c[name].split()) == " ".join(metal_c[name].replace("SIMD", "32").split()), name
    from mhc_aot import cuda as launcher_cuda
    from mhc_aot import metal as launcher_metal

    for name, expected in (("THREADS", 256), ("TILE_C", 1024), ("DM_CHUNK", 32), ("IB", 8)):
        assert getattr(launcher_metal, name) == getattr(launcher_cuda, name) == expected, name
    assert launcher_metal.SMALL_N == launcher_cuda.SMALL_N and launcher_metal.TILE == launcher_cuda.TILE
    assert metal_c["SINKHORN_TG_FLOATS"] == "64 * 64" and launcher_metal.SINKHORN_TG_FLOATS == 64 * 64
    assert int(metal_c["GENERIC_N_LIMIT"]) == launcher_metal.GENERIC_N_LIMIT
    assert int(metal_c["DM_N_LIMIT"]) == launcher_metal.DM_N_LIMIT
    assert bm.THREADS == launcher_metal.THREADS and bm.SCALAR_SLOTS == launcher_metal.SCALAR_SLOTS
    assert bm.MAX_THREADS == {"mhc_sinkhorn_fwd": launcher_metal.SMALL_THREADS,
                              "mhc_sinkhorn_bwd": launcher_metal.SMALL_THREADS}


# ---------------------------------------------------------------- the build pipeline (macOS) reviewed on Linux
def test_dry_run_covers_every_variant():
    proc = subprocess.run([sys.executable, "-m", "build_tools.metal", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]
    compiles, link = lines[:-1], lines[-1]
    ported = [v for v in VARIANTS if (METAL / f"{v.source}.metal").exists()]
    assert len(compiles) == len(ported)
    for v, cmd in zip(ported, compiles):
        assert cmd.startswith("xcrun -sdk macosx metal ") and " -c " in cmd, cmd
        for flag in ("-fno-fast-math", "-Wall", "-Wextra", "-std=metal3.1", f"-DMHC_NAME={v.name}",
                     f"-DMHC_DTYPE={v.dtype or 'f32'}", f"-DMHC_NMAX={v.nmax}", f"-DMHC_ENTRY={bm.entry_name(v)}",
                     f"metal_src/{v.source}.metal"):
            assert flag in cmd, f"{v.name}: {flag} missing from {cmd}"
        air = cmd.split(" -o ")[-1]
        assert air.endswith(".air") and air in link, f"{v.name}: {air} not linked"
    assert link.startswith("xcrun -sdk macosx metallib ") and link.endswith(f"/{bm.METALLIB}")


def test_build_skips_off_macos_with_one_line(tmp_path):
    if sys.platform == "darwin":
        pytest.skip("this machine has Xcode's toolchain: the real build runs")
    said = []
    facts, rows = bm.build(tmp_path, tmp_path / "cache", log=said.append)
    assert facts == {"found": False, "reason": "xcrun not found (not macOS)"} and rows == [] and len(said) == 1


def test_entry_names_are_mlx_kernel_names():
    """custom_kernel_<variant>_<input types>_<output types>, the function MLX's metal_kernel fetches
    (the scalars buffer is an int32 input of >= 8 elements: no size suffix)."""
    v = _variant("mhc_forward_fused", "bf16", 4)
    assert bm.entry_name(v) == ("custom_kernel_mhc_forward_fused_bf16_n4_bfloat16_t_float_float_float_float_int32_t"
                                "_bfloat16_t_float")
    names = [bm.entry_name(v) for v in VARIANTS if (METAL / f"{v.source}.metal").exists()]
    assert len(set(names)) == len(names)


# ---------------------------------------------------------------- the kernels RUN under CPU emulation
# Without Apple hardware the Metal kernels still execute here: each variant is compiled with g++
# against metal_src/check/emulate/metal_stdlib (threads of a threadgroup are fibers,
# threadgroup barriers and simdgroup reductions emulated) and launched by a stand-in for
# mx.fast.metal_kernel that binds buffers in MLX's order. The whole Metal path of mhc_aot.metal
# (dispatch, launch geometry, scalars buffer, padding to 8 elements, custom VJPs) runs against the
# float64 ground truth of tests/backends.py. It proves the algorithm and the indexing, NOT the
# Metal compiler, the preload into MLX, GPU memory ordering or timing.
#
# Shape table (B, n, C): every strategy and both sides of its rules: fused (B > 7) and column
# (B <= 7, C over one TILE_C); vector (C % 4 == 0) and scalar paths; compile-time NMAX variants
# (n <= 4: dM in registers; 4 < n <= 8: one row block and the dM kernel; n = 12: two row blocks)
# and the generic kernel (n = 70 > 64: M read in place, backward through MLX's VJP by rule);
# Sinkhorn n <= 32 (registers, 1024 threads) and above (threadgroup memory, then in place).
# Tolerance table: float32 forward 1e-5, float16 2e-3, bfloat16 1e-2 (testing.TOLERANCES);
# gradients (float32) 1e-4 relative to the float64 gradient.
EMU_FORWARD = [(9, 4, 64, "float32"), (9, 3, 33, "float32"), (2, 4, 1030, "float32"), (9, 12, 24, "float32"),
               (8, 70, 8, "float32"), (9, 4, 64, "float16"), (9, 6, 20, "bfloat16"), (3, 2, 9, "bfloat16")]
EMU_GRADS = [(9, 4, 64), (9, 6, 40), (8, 12, 12), (3, 5, 1027)]
EMU_SINKHORN = [1, 3, 32, 33, 70]
GRAD_TOL = 1e-4


@pytest.fixture(scope="module")
def _emulations():
    return metal_emulation.emulations()


@pytest.fixture
def emulated_metal(_emulations, monkeypatch):
    return metal_emulation.patch(monkeypatch, _emulations)


def _inputs(B, n, C, dtype_name, seed):
    from mhc_aot import testing

    p = testing.random_params(n, C, seed)
    x = testing.random_input((B, n, C), testing.DTYPES[dtype_name], seed + 1)
    return x, p["H_pre_raw"], p["H_post_raw"], p["H_res_raw"], p["rms_weight"]


@pytest.mark.parametrize("n", EMU_SINKHORN)
def test_emulated_metal_sinkhorn(emulated_metal, n):
    H = _inputs(1, n, 4, "float32", seed_of("emu-sinkhorn", n))[3]
    M = run_forward(ops.sinkhorn, H, backend="metal")
    assert rel_error64(M, value64(sinkhorn64, H)) < testing.tolerance(mx.float32)
    G = mx.random.normal((n, n), key=mx.random.key(n))
    got = mx.grad(lambda h: mx.sum(ops.sinkhorn(h, backend="metal") * G))(H)
    assert rel_error64(got, grads64(sinkhorn64, [H], G)[0]) < GRAD_TOL


@pytest.mark.parametrize("B,n,C,dtype_name", EMU_FORWARD)
def test_emulated_metal_forward(emulated_metal, B, n, C, dtype_name):
    args = _inputs(B, n, C, dtype_name, seed_of("emu-forward", B, n, C, dtype_name))
    out = run_forward(ops.mhc_forward, *args, backend="metal")
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    err = rel_error64(out, value64(forward64, *args))
    strategy = dispatch.choose("mhc_forward", n, C, "metal", B=B).strategy
    assert err < testing.tolerance(args[0].dtype), f"{strategy} B={B} n={n} C={C} {dtype_name}: {err:.3e}"


@pytest.mark.parametrize("B,n,C", EMU_GRADS)
def test_emulated_metal_forward_grads(emulated_metal, B, n, C):
    args = _inputs(B, n, C, "float32", seed_of("emu-grad", B, n, C))
    G = mx.random.normal((B, n, C), key=mx.random.key(B * n + C))
    got = mx.grad(lambda *a: mx.sum(ops.mhc_forward(*a, backend="metal") * G), argnums=tuple(range(5)))(*args)
    for name, g, want in zip(("x", "H_pre_raw", "H_post_raw", "H_res_raw", "rms_weight"), got,
                             grads64(forward64, list(args), G)):
        err = rel_error64(g, want)
        assert err < GRAD_TOL, f"d{name} B={B} n={n} C={C}: relative error {err:.3e}"


@pytest.mark.parametrize("B,n,C,dtype_name", [(3, 4, 64, "float32"), (2, 5, 1029, "float32"), (4, 70, 12, "float32"),
                                              (3, 8, 16, "bfloat16")])
def test_emulated_metal_stream_mix_add(emulated_metal, B, n, C, dtype_name):
    seed = seed_of("emu-mix", B, n, C, dtype_name)
    dt = testing.DTYPES[dtype_name]
    x, bias, M = testing.random_input((B, n, C), dt, seed), testing.random_input((B, n, C), dt, seed + 1), random_M(n, seed)
    out = run_forward(ops.stream_mix_add, x, M, bias, backend="metal")
    assert rel_error64(out, value64(mix_add64, x, M, bias)) < testing.tolerance(dt)
    if dtype_name == "float32":
        G = mx.random.normal((B, n, C), key=mx.random.key(seed))
        got = mx.grad(lambda *a: mx.sum(ops.stream_mix_add(*a, backend="metal") * G), argnums=(0, 1, 2))(x, M, bias)
        for g, want in zip(got, grads64(mix_add64, [x, M, bias], G)):
            assert rel_error64(g, want) < GRAD_TOL


def test_emulated_metal_sinkhorn_when_pipeline_allows_256_threads(emulated_metal, _emulations, monkeypatch):
    """A pipeline limited below 1024 threads per threadgroup (the preload reports it) makes n <= 32
    take the general path, which must give the same result."""


    for source in ("mhc_sinkhorn_fwd", "mhc_sinkhorn_bwd"):
        monkeypatch.setattr(_emulations(source, None, None), "max_threads", 256)
    H = _inputs(1, 7, 4, "float32", seed_of("emu-sinkhorn-256"))[3]
    M = run_forward(ops.sinkhorn, H, backend="metal")
    assert rel_error64(M, value64(sinkhorn64, H)) < testing.tolerance(mx.float32)
    G = mx.random.normal((7, 7), key=mx.random.key(7))
    got = mx.grad(lambda h: mx.sum(ops.sinkhorn(h, backend="metal") * G))(H)
    assert rel_error64(got, grads64(sinkhorn64, [H], G)[0]) < GRAD_TOL
