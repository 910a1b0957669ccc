"""The `mhc` command line: every command in every format, through Typer's CliRunner and as a
subprocess; bad options end as one line with exit code 2; validate names a broken variant.

Tiny shapes and --iters 3 --warmup 1 everywhere, so the file runs in well under a minute on a
2-core CPU.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mhc_aot import bench, dispatch, manifest
from mhc_aot.cli.main import app

TINY = ["--B", "2", "--n", "4", "--C", "64", "--iters", "3", "--warmup", "1"]
FORMATS = ("table", "json", "csv")
ON_CPU = dispatch.device_backend() == "cpu"


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2: keep stderr apart
    except TypeError:
        return CliRunner()  # click >= 8.2 (and Typer's bundled copy): stderr is always apart


def invoke(*args: str):
    return _runner().invoke(app, list(args))


def parse(fmt: str, text: str):
    if fmt == "json":
        return json.loads(text)
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    return text


def _assert_info_exit(code: int, stderr: str) -> None:
    """0, or 1 with the fix when this install's kernel files are missing or corrupted (a build
    tree being rewritten counts: `mhc info` reads the files as they are)."""
    assert code == 0 or (code == 1 and "reinstall" in stderr and stderr.count("\n") == 1), (code, stderr)


# ---------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["info", "bench", "validate", "profile"])
def test_help_has_examples(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    assert "Examples" in r.stdout and f"mhc {command}" in r.stdout


@pytest.mark.parametrize("command", ["info", "bench", "validate", "profile"])
def test_help_paragraphs_are_filled(command):
    """Each paragraph of a command's help flows as prose at the terminal's width: on a wide terminal it
    is one line, not broken where the source's docstring lines end (and no line of it turns into a
    list item, as a line starting with "+" would in Markdown)."""
    doc = importlib.import_module(f"mhc_aot.cli.{command}").HELP
    r = _runner().invoke(app, [command, "--help"], env={"COLUMNS": "1000", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    lines = [re.sub(r"\s+", " ", ln).strip() for ln in r.stdout.splitlines()]
    for para in doc.split("\n\n"):
        words = re.sub(r"[`]", "", re.sub(r"\s+", " ", para)).strip()
        assert words in lines, f"mhc {command} --help: paragraph not on one line: {words[:60]!r}"


def test_root_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for command in ("info", "bench", "validate", "profile"):
        assert command in r.stdout


# ---------------------------------------------------------------- info
@pytest.mark.parametrize("fmt", FORMATS)
def test_info_formats(fmt):
    r = invoke("info", "--dispatch", "--format", fmt)
    _assert_info_exit(r.exit_code, r.stderr)
    data = parse(fmt, r.stdout)
    if fmt == "json":
        assert data["meta"]["versions"]["MLX"]
        assert data["meta"]["device"]["backend"] == dispatch.device_backend()
        assert data["meta"]["dispatch rules"] == dispatch.rules_table()
        assert any(k.startswith("latency B=1 n=32") for k in data["meta"]["dispatch"])
    elif fmt == "csv":
        sections = {row["section"] for row in data}
        assert {"versions", "device", "kernels", "dispatch", "dispatch rules"} <= sections
    else:
        assert "MLX" in data and "dispatch" in data and "FUSED" not in data


@pytest.mark.parametrize("env,want", [(None, "TF32"), ("1", "TF32"), ("0", "float32"), ("2", "TF32")])
def test_info_says_whether_mlx_float32_matmuls_are_tf32(monkeypatch, env, want):
    """On CUDA, `mhc info` says whether MLX's float32 matmuls (the portable path's) are TF32, as MLX
    reads MLX_ENABLE_TF32 (an integer, 0 = off; unset = MLX's default, on)."""
    from mhc_aot import device
    from mhc_aot.cli import info as info_cli

    if env is None:
        monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    else:
        monkeypatch.setenv("MLX_ENABLE_TF32", env)
    monkeypatch.setattr(info_cli.dispatch, "device_backend", lambda device=None: "cuda")
    monkeypatch.setattr(device, "cuda_facts", lambda: {"available": False, "reason": "stubbed"})
    facts = info_cli._device_facts()
    assert facts["MLX float32 matmuls"].split()[0] == want
    monkeypatch.setattr(info_cli.dispatch, "device_backend", lambda device=None: "cpu")
    assert "MLX float32 matmuls" not in info_cli._device_facts()  # MLX's CPU matmuls are float32


def test_info_fails_with_the_fix_when_kernels_are_corrupted(monkeypatch):
    bad = (f"kernel file x.cubin of variant mhc_forward_fused_f32 does not match its sha256 in the manifest "
           f"(corrupted): {manifest.REINSTALL_HINT}")
    monkeypatch.setattr(manifest, "verify_all", lambda backend=None: [bad])
    r = invoke("info")
    assert r.exit_code == 1
    assert "mhc_forward_fused_f32" in r.stderr and "reinstall" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- bench
@pytest.mark.skipif(not ON_CPU, reason="the matmul rate is measured on MLX's CPU backend only")
@pytest.mark.parametrize("gflops,slow", [(3.0, True), (150.0, False)])
def test_bench_cpu_matmul_note(monkeypatch, gflops, slow):
    """On the CPU the table's notes give MLX's matmul rate, and point to the OpenBLAS preload only
    when the rate is the reference BLAS's."""
    monkeypatch.setattr(bench, "measure_matmul_gflops", lambda iters=10: gflops)
    r = invoke("bench", *TINY, "--format", "table")
    assert r.exit_code == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert f"MLX's float32 matmul: {gflops:.1f} GFLOP/s" in text
    assert ("OpenBLAS preload" in text) == slow


@pytest.mark.parametrize("fmt", FORMATS)
def test_bench_formats(fmt):
    r = invoke("bench", *TINY, "--format", fmt, "--compare", "reference")
    assert r.exit_code == 0, r.stderr
    data = parse(fmt, r.stdout)
    if fmt == "json":
        rows = data["rows"]
        assert [x["impl"] for x in rows] == ["kernels", "reference"]
        k = rows[0]
        assert k["p20_us"] <= k["median_us"] <= k["p80_us"] and k["GBps"] > 0 and k["speedup_vs_reference"] > 0
        assert data["meta"]["copy_GBps"] > 0
    elif fmt == "csv":
        assert data[0]["impl"] == "kernels" and float(data[0]["speedup_vs_reference"]) > 0
    else:
        assert "kernels" in data and "vs reference" in data
        if ON_CPU:
            assert "IS the portable path" in data


def test_bench_throughput_backward_and_out_file(tmp_path):
    out = tmp_path / "b.json"
    r = invoke("bench", "--mode", "throughput", "--config", "2:4:64,2:4:32", "--backward", "--repeats", "2",
               "--iters", "3", "--warmup", "1", "--compare", "portable", "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "" and "wrote json" in r.stderr  # format from the suffix; data only in the file
    data = json.loads(out.read_text())
    assert {x["pass"] for x in data["rows"]} == {"forward+backward"}
    assert [(x["C"], x["impl"]) for x in data["rows"]] == [(64, "kernels"), (64, "portable"), (32, "kernels"),
                                                           (32, "portable")]
    assert all(x["samples"] == 2 for x in data["rows"])


def test_bench_default_shapes():
    from mhc_aot.cli.bench import resolve_shapes

    assert resolve_shapes("latency", [], [], [], [], None) == list(bench.LATENCY_SHAPES)
    assert resolve_shapes("throughput", [32], [], [], [], None) == list(bench.THROUGHPUT_SHAPES)
    assert resolve_shapes("throughput", [8], [], [], ["32:2048", "4:4096"], None) == [(8, 32, 2048), (8, 4, 4096)]
    assert resolve_shapes("latency", [], [], [512], [], None) == [(1, 32, 512)]
    assert resolve_shapes("latency", [], [], [], [], "large") == list(bench.LARGE_SHAPES)


def test_bench_compare_seed():
    pytest.importorskip("mhc_mlx", reason="mhc-mlx is not installed (pip install 'mhc-aot[test]')")
    r = invoke("bench", *TINY, "--compare", "seed", "--format", "json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert rows[1]["impl"] == "seed" and rows[0]["speedup_vs_seed"] > 0


def test_bench_dynamic_layer():
    r = invoke("bench", "--layer", "dynamic", *TINY, "--compare", "portable", "--format", "json", "--backward")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert {x["layer"] for x in rows} == {"dynamic"}
    assert {x["phi_dtype"] for x in rows} == {"bfloat16"}  # x's dtype (bench's default), as the liger peer's


def test_bench_phi_dtype():
    r = invoke("bench", "--layer", "dynamic", *TINY, "--compare", "none", "--format", "json", "--phi-dtype", "f32")
    assert r.exit_code == 0, r.stderr
    assert [x["phi_dtype"] for x in json.loads(r.stdout)["rows"]] == ["float32"]
    r = invoke("bench", "--layer", "dynamic", *TINY, "--phi-dtype", "int8")
    assert r.exit_code != 0 and "--phi-dtype 'int8'" in r.stderr and "bfloat16" in r.stderr
    r = invoke("bench", *TINY, "--phi-dtype", "float32")
    assert r.exit_code != 0 and "only --layer dynamic has a phi" in r.stderr


def test_bench_plot_png(tmp_path):
    mpl_image = pytest.importorskip("matplotlib.image", reason="matplotlib (the plot extra) is not installed")
    png = tmp_path / "speedup.png"
    r = invoke("bench", "--B", "1", "--n", "4", "--C", "32,64", "--iters", "3", "--warmup", "1",
               "--plot", str(png), "--quiet")
    assert r.exit_code == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = mpl_image.imread(str(png)).shape[:2]
    assert h > 100 and w > 100


def test_bench_plot_without_matplotlib(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    r = invoke("bench", *TINY, "--plot", "x.png")
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "pip install 'mhc-aot[plot]'" in r.stderr


# ---------------------------------------------------------------- validate
@pytest.mark.parametrize("fmt", FORMATS)
def test_validate_quick(fmt):
    r = invoke("validate", "--quick", "--format", fmt)
    assert r.exit_code == 0, r.stderr
    data = parse(fmt, r.stdout)
    if fmt == "json":
        rows = data["rows"]
        assert rows and all(x["result"] == "pass" for x in rows)
        assert {"sinkhorn", "mhc_forward", "mhc_backward", "stream_mix_add"} <= {x["op"] for x in rows}
        assert {"float32", "bfloat16"} <= {x["dtype"] for x in rows}
        assert max(x["n"] for x in rows) > 64  # above the largest compile-time NMAX: the generic kernel
        assert "portable" in {x["backend"] for x in rows}
    elif fmt == "csv":
        assert all(x["result"] == "pass" for x in data)
    elif ON_CPU:
        assert "portable path" in data and "is what is validated" in data


def _cuda_coeffs_names(dtype: str, n: int) -> list[str]:
    """validate's variant names of the CUDA mhc_coeffs family for (dtype, n); skips without that build."""
    from mhc_aot.cli import validate

    rows = [r for r in validate._manifest_rows() if r["backend"] == "cuda" and r["op"] == "mhc_coeffs"]
    if not rows:
        pytest.skip("this build shipped no CUDA dynamic kernels (no nvcc)")
    return validate.variant_name("cuda", "mhc_coeffs", rows[0]["strategy"], dtype, n).split("+")


def test_validate_variant_names_only_kernels_built_for_the_dtype():
    """A kernel family whose sources are built for some dtypes only (the dynamic coefficients'
    tensor-core projection: bfloat16) names, for another dtype, the kernels that run for it, not a
    missing kernel with reinstall advice (every float32 and float16 mhc_coeffs row did until session 24)."""
    bf16, f32 = _cuda_coeffs_names("bfloat16", 4), _cuda_coeffs_names("float32", 4)
    assert "mhc_dynamic_proj_tc_bf16" in bf16 and not any("proj_tc" in v for v in f32), (bf16, f32)
    assert any(v.startswith("mhc_dynamic_coeffs_f32") for v in f32), f32


def test_validate_variant_names_only_kernels_built_for_the_n():
    """Above the NMAX of a family's kernels built without a generic one (the one-read and few-token
    coefficient kernels: n <= 4), the names are the kernels that run for that n, not a missing kernel
    (every n = 5 mhc_coeffs row of the CUDA plan read "missing (...)" until session 38)."""
    n4, n5 = _cuda_coeffs_names("bfloat16", 4), _cuda_coeffs_names("bfloat16", 5)
    assert any(v.startswith("mhc_dynamic_coeffs_pre") for v in n4), n4
    assert not any(v.startswith(("missing", "mhc_dynamic_coeffs_pre", "mhc_dynamic_coeffs_proj")) for v in n5), n5
    assert "mhc_dynamic_coeffs_bf16" in n5, n5


def test_validate_reference_error_over_token_orders(monkeypatch):
    """A gradient's bound rests on the float32 reference's worst error over distinct token orders:
    the orders are permutations, each undone on the gradients with a token axis, and they round the
    float32 reference differently (a larger error than the given order's on these inputs)."""
    from mhc_aot.cli import validate

    for B, count in ((1, 1), (2, 2), (3, 3), (5, 3)):
        orders = validate._token_orders(B)
        assert len(orders) == count and all(sorted(o.tolist()) == list(range(B)) for o in orders)
    monkeypatch.setattr(validate, "_seed", lambda check: 7)
    check = validate.Check("portable", "mhc_coeffs", True, 3, 4, 130, "float32", "portable", "portable")
    with mx.stream(mx.cpu):  # float32 arithmetic (a GPU's matmuls may run in TF32)
        args, _ = validate._inputs(check)
        ref_fn = validate._reference_fn(check.op)
        outs = validate._as_tuple(ref_fn(*args))
        Gs = [mx.random.normal(o.shape, key=mx.random.key(11 + i)) for i, o in enumerate(outs)]
        truth = validate._grads64(validate._dynamic_truth_fn(check.op), args, Gs)
        one = [validate._rel(g, t) for g, t in zip(validate._grads(ref_fn, args, Gs), truth)]
        worst = validate._reference_errors(check, ref_fn, args, Gs, truth)
    assert all(w >= o for w, o in zip(worst, one)) and any(w > o for w, o in zip(worst, one)), (one, worst)
    assert max(worst) < 1e-4, worst  # still rounding: an order not undone would show as an O(1) error


def test_validate_shared_gradient_bound_rests_on_its_terms(monkeypatch):
    """A shared argument's gradient (phi, b, the alphas) is a sum over its uses, and validate bounds
    its error by the tolerance on the sum of its terms' magnitudes: per token for phi and b (equal to
    a loop over tokens here), per logit for the alphas (at least the per-token sum). At this seed
    dalpha_res cancels to 0.2% of its terms' sum: an error of half that bound passes, three times it
    fails, and without the terms the first fails too (the float32 rows' flake, session 24)."""
    from mhc_aot import ops, testing
    from mhc_aot.cli import validate

    monkeypatch.setattr(validate, "_seed", lambda check: 1)
    check = validate.Check("portable", "mhc_coeffs", True, 3, 4, 130, "float32", "portable", "portable")
    truth_fn = validate._dynamic_truth_fn(check.op)
    with mx.stream(mx.cpu):  # float32 arithmetic (a GPU's matmuls may run in TF32)
        args, _ = validate._inputs(check)
        outs = validate._as_tuple(validate._reference_fn(check.op)(*args))
        Gs = [testing.random_input(o.shape, mx.float32, 2 + i) for i, o in enumerate(outs)]
        truth = validate._grads64(truth_fn, args, Gs)
        terms = validate._term_magnitudes(check, truth_fn, args, Gs)
        assert sorted(terms) == [1, 2, 3, 4, 5]  # phi, b, alpha_pre, alpha_post, alpha_res
        per_token = [validate._grads64(truth_fn, [args[0][t:t + 1], *args[1:]], [G[t:t + 1] for G in Gs])
                     for t in range(check.B)]
        for i in range(1, 6):
            tokens = sum(mx.abs(g[i]) for g in per_token)
            if i <= 2:
                assert mx.allclose(terms[i], tokens, rtol=1e-5, atol=0).item(), i
            else:
                assert terms[i].item() >= tokens.item() * (1 - 1e-6) >= abs(truth[i].item()) * (1 - 1e-6), i
    size = terms[5].item()
    assert abs(truth[5].item()) < 0.01 * size  # the premise: a cancelling sum

    def shifted(delta):
        @mx.custom_function
        def shift(a):
            return a

        @shift.vjp
        def shift_vjp(primals, cotangent, output):
            return (cotangent + delta,)

        return lambda x, *p: ops.mhc_coeffs_pre(x, *p[:4], shift(p[4]), backend="portable")

    real_op_fn = validate._op_fn

    def row(k):  # the op under test shifted; the float32 reference (also through _op_fn) as it is
        monkeypatch.setattr(validate, "_op_fn", lambda op, backend: (
            shifted(k * testing.tolerance(mx.float32) * size) if backend == "portable" else real_op_fn(op, backend)))
        with mx.stream(mx.cpu):
            return validate.run_check(check)

    assert row(0.5)["result"] == "pass"
    wrong = row(3.0)
    assert wrong["result"] == "FAIL" and wrong["checked"] == "dalpha_res", wrong
    monkeypatch.setattr(validate, "_term_magnitudes", lambda *a: {})
    assert row(0.5)["result"] == "FAIL"


def test_validate_covers_each_cuda_coefficients_path(monkeypatch):
    """On CUDA, mhc validate checks mhc_coeffs at a shape of every kernel path the op takes inside (not
    only the rule's few-token shapes): the projection path, and on an sm_90 GPU with a bfloat16 x the
    one-read kernel with a bfloat16 phi (its gradients with --full only); its checks carry that phi."""
    from mhc_aot import cuda_dynamic
    from mhc_aot.cli import validate

    monkeypatch.setattr(cuda_dynamic.device, "mlx_arch_number", lambda: cuda_dynamic.CP_ARCH)
    monkeypatch.setattr(cuda_dynamic.device, "max_shared_memory_per_block", lambda: cuda_dynamic.cuda.SMEM_LIMIT)
    monkeypatch.setattr(cuda_dynamic.device, "resident_ctas_per_sm", lambda shared_bytes: 1)
    monkeypatch.setattr(cuda_dynamic.device, "sm_count", lambda: 132)
    paths = lambda dt, full, grad: [(B, C, phi, p) for B, C, phi, p in validate.coeffs_path_shapes(4, dt, full, grad)]  # noqa: E731
    assert paths("bfloat16", False, False) == [(1100, 130, "float32", "projection"),
                                               (1024, 4096, "bfloat16", "one-read")]
    assert paths("bfloat16", False, True) == [(1100, 130, "float32", "projection")]
    assert paths("bfloat16", True, True)[-1] == (1024, 4096, "bfloat16", "one-read")
    assert paths("float32", True, False) == [(1100, 130, "float32", "projection")]  # the one-read rule: bfloat16
    assert validate.coeffs_path_shapes(8, "bfloat16", True, False) == []
    monkeypatch.setattr(cuda_dynamic.device, "mlx_arch_number", lambda: 100)  # no sm_90a: no one-read kernel
    assert paths("bfloat16", True, True) == [(1100, 130, "float32", "projection")]
    check = validate.Check("portable", "mhc_coeffs", False, 2, 4, 8, "bfloat16", "fused (one-read)", "x", "bfloat16")
    args, names = validate._inputs(check)
    assert names[1] == "phi" and args[1].dtype == mx.bfloat16


def test_validate_names_a_broken_variant(monkeypatch):
    """A portable forward made wrong on purpose: exit 1, the variant and op named."""
    from mhc_aot import ops

    real = ops._portable_forward

    def broken(iters, eps):
        good = real(iters, eps)
        return lambda x, *p: (good(x, *p).astype(ops.mx.float32) * 1.001).astype(x.dtype)

    monkeypatch.setattr(ops, "_portable_forward", broken)
    r = invoke("validate", "--quick", "--format", "json", "--quiet")
    assert r.exit_code == 1
    rows = json.loads(r.stdout)["rows"]
    failed = {(x["variant"], x["op"]) for x in rows if x["result"] != "pass"}
    assert ("portable", "mhc_forward") in failed and ("portable", "mhc_backward") in failed
    assert all(x["result"] == "pass" for x in rows if x["op"] in ("sinkhorn", "stream_mix_add"))
    assert len(r.stderr.strip().splitlines()) == 1
    assert "portable (portable mhc_forward)" in r.stderr


# ---------------------------------------------------------------- profile
@pytest.mark.parametrize("fmt", FORMATS)
def test_profile_trace(tmp_path, fmt):
    out = tmp_path / "prof"
    r = invoke("profile", *TINY, "--out", str(out), "--no-ncu", "--format", fmt)
    assert r.exit_code == 0, r.stderr
    trace = json.loads((out / "trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    timed = [e for e in events if e["cat"] == "mhc"]
    assert {e["name"] for e in timed} == {"sinkhorn", "forward", "backward"}
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in events)
    assert sum(e["name"] == "forward" for e in timed) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert [x["stage"] for x in summary["rows"]] == ["sinkhorn", "forward", "backward"]
    data = parse(fmt, r.stdout)
    if fmt == "json":
        assert data["meta"]["trace"].endswith("trace.json")
    elif fmt == "csv":
        assert [x["stage"] for x in data] == ["sinkhorn", "forward", "backward"]
    else:
        assert "backward" in data


def test_profile_dynamic_layer_trace(tmp_path):
    out = tmp_path / "prof"
    r = invoke("profile", *TINY, "--layer", "dynamic", "--out", str(out), "--no-ncu", "--format", "json")
    assert r.exit_code == 0, r.stderr
    timed = [e for e in json.loads((out / "trace.json").read_text())["traceEvents"]
             if e["ph"] == "X" and e["cat"] == "mhc"]
    assert [e["name"] for e in timed] == [s for s in ("coeffs", "post_res", "forward", "backward") for _ in range(3)]
    assert all(e["dur"] > 0 and e["args"]["layer"] == "dynamic" for e in timed)
    data = json.loads(r.stdout)
    assert [x["stage"] for x in data["rows"]] == ["coeffs", "post_res", "forward", "backward"]
    assert all(x["strategy"] for x in data["rows"])


# ---------------------------------------------------------------- bad options: one line, exit 2
BAD = [
    ("bench", "--dtype", "float8"),
    ("bench", "--C", "0"),
    ("bench", "--C", "-5"),
    ("bench", "--B", "1", "--n", "100000", "--C", "100000"),
    ("bench", "--iters", "x"),
    ("bench", "--iters", "0"),
    ("bench", "--mode", "fast"),
    ("bench", "--compare", "bogus"),
    ("bench", "--config", "32"),
    ("bench", "--suite", "large", "--C", "64"),
    ("bench", "--no-such-option"),
    ("bench", "--layer", "dynamic", "--compare", "seed"),
    ("validate", "--quick", "--full"),
    ("validate", "--dtype", "int8"),
    ("profile", "--C", "0"),
    ("profile", "--C", "64,128"),
    ("profile", "--n", "1000000", "--C", "100000"),
    ("profile", "--backend", "tpu"),
    ("info", "--format", "xml"),
    ("no-such-command",),
]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_options_one_line_exit_2(args):
    r = invoke(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("mhc: error:") and "\n" not in err, err
    assert "Traceback" not in r.stdout + r.stderr


# ---------------------------------------------------------------- as a subprocess
def _run(*args: str, cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    # cwd away from the repo root, so `python -m` imports the installed package (conftest.py)
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "mhc_aot.cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_subprocess_every_command(tmp_path):
    p = _run("info", "--format", "json", cwd=tmp_path)
    _assert_info_exit(p.returncode, p.stderr)
    assert json.loads(p.stdout)["meta"]["versions"]["MLX"]
    p = _run("bench", *TINY, "--format", "csv", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert list(csv.DictReader(io.StringIO(p.stdout)))[0]["impl"] == "kernels" and p.stderr == ""
    p = _run("validate", "--quick", "--format", "json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert all(x["result"] == "pass" for x in json.loads(p.stdout)["rows"])
    p = _run("profile", *TINY, "--no-ncu", "--out", "prof", "--format", "table", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "prof" / "trace.json").exists() and "sinkhorn" in p.stdout


def test_subprocess_bad_option_is_one_line(tmp_path):
    p = _run("bench", "--dtype", "float8", cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "unknown dtype" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.skipif(shutil.which("mhc") is None, reason="the `mhc` console script is not on PATH")
def test_console_script(tmp_path):
    p = subprocess.run(["mhc", "bench", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "Examples" in p.stdout


@pytest.mark.parametrize("layer,stages", [("static", {"sinkhorn", "forward", "backward"}),
                                          ("dynamic", {"coeffs", "post_res", "forward", "backward"})])
def test_profile_ncu_child_run(tmp_path, monkeypatch, layer, stages):
    """The ncu path: a stand-in `ncu` on PATH runs the child command it is given (as ncu does) and
    writes the report; the child is a real `mhc profile --no-ncu` run."""
    from mhc_aot.cli import profile as prof_cli

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ncu"
    fake.write_text("#!/bin/sh\n# stand-in for Nsight Compute: -o REPORT, then the command\n"
                    "while [ \"$1\" != \"-o\" ]; do shift; done; report=\"$2\"; shift 2\n"
                    "\"$@\" && touch \"$report.ncu-rep\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(prof_cli.dispatch, "device_backend", lambda device=None: "cuda")
    out = tmp_path / "prof"
    out.mkdir()

    def child(run_dir):
        return prof_cli._child_args(2, 4, 64, "float32", "portable", layer, run_dir)

    result = prof_cli._ncu(None, out, child, quiet=True)
    assert result["status"] == "ok", result
    assert (out / "ncu_report.ncu-rep").exists()
    trace = json.loads((out / "ncu_run" / "trace.json").read_text())
    assert {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"} == stages
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "ncu not on PATH" in prof_cli._ncu(None, out, child, quiet=True)["status"]


# ---------------------------------------------------------------- on the GPU machine
@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.skipif(shutil.which("mhc") is None, reason="the `mhc` console script is not on PATH")
def test_cuda_validate_quick_checks_the_kernels(tmp_path):
    """`mhc validate --quick` on a CUDA machine: every row passes (float64 ground truth computed on
    the CPU stream, float32 checks without TF32) and the CUDA kernel families are among them."""
    p = _run("validate", "--quick", "--format", "json", "--quiet", cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    failed = [r for r in data["rows"] if r["result"] != "pass"]
    assert not failed, failed[:3]
    ops_on_cuda = {r["op"].split()[0] for r in data["rows"] if r["backend"] == "cuda"}
    assert {"sinkhorn", "mhc_forward", "mhc_backward", "stream_mix_add", "mhc_coeffs", "mhc_pre",
            "mhc_post_res"} <= ops_on_cuda, ops_on_cuda
    assert data["meta"]["MLX_ENABLE_TF32"] == "0"


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="MLX reports no cuda device")
@pytest.mark.skipif(shutil.which("mhc") is None, reason="the `mhc` console script is not on PATH")
def test_cuda_bench_and_profile_use_the_kernels(tmp_path):
    """On a CUDA machine `mhc bench` times the CUDA kernels (the kernels row says cuda:...), and
    `mhc profile` writes the trace and, when Nsight Compute is on PATH, its report."""
    p = _run("bench", "--mode", "throughput", *TINY, "--compare", "portable", "--format", "json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    kernels = next(r for r in rows if r["impl"] == "kernels")
    assert kernels["note"].startswith("cuda:") and kernels["median_us"] > 0
    p = _run("profile", *TINY, "--out", "prof", "--format", "json", cwd=tmp_path, timeout=300)  # ncu replays
    assert p.returncode == 0, p.stderr
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    assert {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"} == {"sinkhorn", "forward", "backward"}
    if shutil.which("ncu"):
        report = tmp_path / "prof" / "ncu_report.ncu-rep"
        assert report.exists() and report.stat().st_size > 0, p.stderr
