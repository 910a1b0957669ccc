"""mhc_aot.bench, the benchmark library behind `mhc bench`: shape tables, byte model, timing loops,
memory check and the speedup plot. Tiny shapes only; timings themselves are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest

from mhc_aot import bench, dispatch, peer_worker


def test_default_tables_are_the_seed_readme_tables():
    assert bench.default_shapes("latency") == tuple((1, 32, C) for C in (256, 1024, 2048, 4096, 8192))
    assert bench.default_shapes("throughput") == ((32, 32, 2048), (32, 32, 512), (32, 4, 4096))
    assert bench.SUITES["large"] == ((4096, 4, 4096), (1024, 32, 2048))
    assert all(n == 4 for _, n, _ in bench.default_shapes("latency", "dynamic"))


def test_byte_model():
    fwd = bench.Case("latency", 2, 4, 8, "bfloat16")
    assert fwd.bytes_moved == 2 * 2 * 4 * 8 * 2  # x read + out written, 2 bytes each
    bwd = bench.Case("latency", 2, 4, 8, "float32", backward=True)
    assert bwd.bytes_moved == 5 * 2 * 4 * 8 * 4  # + x, dout read and dx written
    dyn = bench.Case("latency", 2, 4, 8, "float32", layer="dynamic")
    assert dyn.bytes_moved == 2 * 2 * 4 * 8 * 4 + 4 * (4 * 8) * (16 + 8)  # + phi read once
    dyn16 = bench.Case("latency", 2, 4, 8, "bfloat16", backward=True, layer="dynamic")  # phi in x's dtype
    assert dyn16.phi == "bfloat16"
    assert dyn16.bytes_moved == 5 * 2 * 4 * 8 * 2 + 3 * 2 * (4 * 8) * (16 + 8)  # + phi read twice, dphi written
    dyn32 = bench.Case("latency", 2, 4, 8, "bfloat16", layer="dynamic", phi_dtype="float32")
    assert dyn32.bytes_moved == 2 * 2 * 4 * 8 * 2 + 4 * (4 * 8) * (16 + 8)


def test_percentile_interpolates():
    assert bench.percentile([1, 2, 3, 4, 5], 50) == 3
    assert bench.percentile([1, 2, 3, 4, 5], 20) == pytest.approx(1.8)
    assert bench.percentile([7], 80) == 7


class _Counting:
    def __init__(self):
        self.calls = self.evals = self.enqueued = self.syncs = 0

    def runner(self):
        def call():
            self.calls += 1
            return self.calls

        def ev(_):
            self.evals += 1

        def enq(_):
            self.enqueued += 1

        def sync():
            self.syncs += 1

        return bench.Runner("fake", call, evaluate=ev, enqueue=enq, synchronize=sync)


def test_latency_evaluates_every_call():
    c = _Counting()
    t = bench.time_runner(c.runner(), "latency", iters=5, warmup=2)
    assert len(t.samples_s) == 5 and c.calls == 7 and c.evals == 7 and c.enqueued == 0
    assert t.p20_us <= t.median_us <= t.p80_us


def test_throughput_queues_then_synchronises_once_per_batch():
    c = _Counting()
    t = bench.time_runner(c.runner(), "throughput", iters=4, warmup=1, repeats=3)
    assert len(t.samples_s) == 3
    assert c.calls == 1 + 12 and c.enqueued == 12
    assert c.evals == 1 + 3  # warmup, then the last call of each batch


def test_run_rows_and_speedups():
    cases = bench.make_cases("throughput", [(2, 4, 16)], ["float32"], backward=True)
    res = bench.run(cases, ["portable", "reference"], bench.Settings(iters=2, warmup=1, repeats=2), copy_gbps=1.0)
    assert [r["impl"] for r in res.rows] == ["kernels", "portable", "reference"]
    k = res.rows[0]
    assert k["pass"] == "forward+backward" and k["samples"] == 2
    for c in ("portable", "reference"):
        assert k[f"speedup_vs_{c}"] > 0
    assert res.meta["copy_GBps"] == 1.0 and res.meta["compare"] == ["portable", "reference"]


def test_run_reports_cpu_matmul_rate():
    """A CPU run measures MLX's float32 matmul rate (its BLAS sets the portable path's matmuls' speed);
    a GPU run leaves it out; a rate passed in is kept."""
    cases = bench.make_cases("latency", [(2, 4, 16)], ["float32"], backward=False)
    settings = bench.Settings(iters=2, warmup=1, repeats=1)
    res = bench.run(cases, [], settings, copy_gbps=1.0)
    rate = res.meta["matmul_GFLOPs"]
    if dispatch.device_backend() == "cpu":
        assert rate is not None and rate > 0
    else:
        assert rate is None
    assert bench.run(cases, [], settings, copy_gbps=1.0, matmul_gflops=7.5).meta["matmul_GFLOPs"] == 7.5


def test_dynamic_layer_runs(monkeypatch):
    cases = bench.make_cases("latency", [(2, 2, 8)], ["bfloat16"], backward=True, layer="dynamic")
    res = bench.run(cases, ["portable"], bench.Settings(iters=2, warmup=1, repeats=1), copy_gbps=1.0)
    assert [r["layer"] for r in res.rows] == ["dynamic", "dynamic"]
    assert [r["phi_dtype"] for r in res.rows] == ["bfloat16", "bfloat16"]
    # the timed layer's phi is in the case's phi dtype: x's by default, else the one asked for
    built = []
    real = bench.dynamic_layer
    monkeypatch.setattr(bench, "dynamic_layer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    for phi_dtype, want in ((None, mx.bfloat16), ("float32", mx.float32)):
        case = bench.make_cases("latency", [(2, 2, 8)], ["bfloat16"], False, "dynamic", phi_dtype)[0]
        bench.make_runner("portable", case, bench.make_inputs(case))
        assert built[-1].phi.dtype == want, (phi_dtype, built[-1].phi.dtype)
    with pytest.raises(bench.BenchError, match="seed has no dynamic"):
        bench.run(cases, ["seed"], bench.Settings(iters=1, warmup=0, repeats=1), copy_gbps=1.0)


def test_dynamic_layer_stack(monkeypatch):
    """make_runner(..., layers=L) (scripts/gpu_dynamic_ab.py --layers): L layers of their own, x through each
    in turn, so its output is the layers called one after another; a stack is for the dynamic layer's MLX
    rows only, and elsewhere a ValueError names the argument."""
    built = []
    real = bench.dynamic_layer
    monkeypatch.setattr(bench, "dynamic_layer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    case = bench.make_cases("latency", [(3, 2, 8)], ["float32"], False, "dynamic")[0]
    inp = bench.make_inputs(case)
    runner = bench.make_runner("portable", case, inp, layers=3)
    assert len(built) == 3 and len({id(layer) for layer in built}) == 3
    saved = [layer.trainable_parameters() for layer in built]
    out = runner.call()
    want = inp.x
    for layer, params in zip(built, saved):
        layer.update(params)  # (the compiled call left its traced inputs in the modules)
        want = layer(want)
    assert mx.allclose(out, want, rtol=1e-5, atol=1e-5).item()
    assert not mx.allclose(out, built[0](inp.x), rtol=1e-3, atol=1e-3).item()  # more than one layer ran
    static = bench.make_cases("latency", [(3, 2, 8)], ["float32"], False)[0]
    with pytest.raises(ValueError, match="layers: got 2"):
        bench.make_runner("portable", static, bench.make_inputs(static), layers=2)


# ---------------------------------------------------------------- peers in a child process
FAKE_WORKER = """
import json, sys
spec = json.load(sys.stdin)
print("a library's chatter on stdout")
print(json.dumps({"results": [{"samples_s": [1e-3, 2e-3, 4e-3], "note": f"fake {spec['impl']} B={c['B']}"}
                              for c in spec["cases"]]}))
"""


@pytest.fixture
def fake_pytorch(tmp_path, monkeypatch):
    """Importable (empty) torch and liger_kernel packages, so availability() finds the peers here,
    and a fake peer worker; afterwards the test asserts that this process imported neither."""
    for name in ("torch", "liger_kernel"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench, "PEER_WORKER", [sys.executable, "-c", FAKE_WORKER])
    yield
    for name in ("torch", "liger_kernel"):
        sys.modules.pop(name, None)


def test_peer_spec_round_trip():
    cases = [bench.Case("throughput", 3, 4, 16, "float16", backward=True, layer="dynamic"),
             bench.Case("latency", 1, 2, 8, "float32", layer="dynamic")]
    settings = [bench.Settings(iters=7, warmup=2, repeats=5), bench.Settings(iters=3, warmup=1, repeats=1)]
    assert peer_worker.read_spec(json.dumps(bench.peer_spec("liger", cases, settings, 11))) == (
        "liger", cases, settings, 11)


def test_child_draws_the_parents_inputs():
    """The child rebuilds the case's inputs from the seed: the same values in a fresh process."""
    code = ("import json; from mhc_aot import bench; "
            "inp = bench.make_inputs(bench.Case('latency', 2, 4, 16, 'bfloat16'), 3); "
            "print(json.dumps([a.astype(bench.mx.float32).tolist() for a in (inp.x, inp.dout, *inp.params.values())]))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    inp = bench.make_inputs(bench.Case("latency", 2, 4, 16, "bfloat16"), 3)
    mine = [a.astype(bench.mx.float32).tolist() for a in (inp.x, inp.dout, *inp.params.values())]
    assert json.loads(child.stdout) == mine


def test_real_worker_times_in_a_child():
    """peer_worker end to end (any implementation runs there; portable needs no PyTorch)."""
    cases = [bench.Case("latency", 2, 4, 16, "float32", backward=True), bench.Case("latency", 1, 2, 8, "float32")]
    out = bench.time_in_child("portable", cases, [bench.Settings(iters=3, warmup=1, repeats=1),
                                                  bench.Settings(iters=2, warmup=1, repeats=1)])
    assert [len(t.samples_s) for t, _ in out] == [3, 2] and all(v > 0 for t, _ in out for v in t.samples_s)
    assert all(note.endswith(":portable") for _, note in out)


@pytest.mark.parametrize("layer,peer", [("static", "torch"), ("dynamic", "liger")])
def test_run_times_pytorch_peers_in_a_child(fake_pytorch, layer, peer):
    assert bench.availability(peer, layer) is None
    cases = bench.make_cases("latency", [(2, 4, 16), (3, 4, 8)], ["float32"], backward=False, layer=layer)
    res = bench.run(cases, ["portable", peer], bench.Settings(iters=2, warmup=1, repeats=1), copy_gbps=1.0)
    assert [(r["impl"], r["B"]) for r in res.rows] == [(i, B) for B in (2, 3) for i in ("kernels", "portable", peer)]
    for k, B in ((0, 2), (3, 3)):
        row = res.rows[k + 2]
        assert row["median_us"] == pytest.approx(2000) and row["samples"] == 3
        assert row["p20_us"] == pytest.approx(1400) and row["p80_us"] == pytest.approx(3200)
        assert row["note"] == f"fake {peer} B={B} (timed in a child process)"
        assert res.rows[k][f"speedup_vs_{peer}"] == pytest.approx(2000 / res.rows[k]["median_us"])
    assert "torch" not in sys.modules and "liger_kernel" not in sys.modules


@pytest.mark.parametrize("script,match", [
    ("import sys; sys.stderr.write('Traceback ...\\nRuntimeError: no CUDA here\\n'); sys.exit(3)",
     r"torch on B=2 n=4 C=16 float32, timed in a child process .*exited with code 3:\nTraceback ...\nRuntimeError: no CUDA here"),
    ("import sys; sys.stderr.write('warming up')", r"printed no result:\nwarming up"),
    ("print('{\"results\": [{\"samples_s\": []}]}')", r"printed 1 results for 1 cases \(or an empty one\)"),
    ("print('done')", r"printed no result \(JSONDecodeError"),
])
def test_failed_child_is_an_error_never_timed_in_process(fake_pytorch, monkeypatch, script, match):
    monkeypatch.setattr(bench, "PEER_WORKER", [sys.executable, "-c", script])
    make_runner = bench.make_runner

    def in_process(name, *args):
        assert name == "kernels", f"{name} was built in-process"
        return make_runner(name, *args)

    monkeypatch.setattr(bench, "make_runner", in_process)
    cases = bench.make_cases("latency", [(2, 4, 16)], ["float32"], backward=False)
    with pytest.raises(bench.BenchError, match=match):
        bench.run(cases, ["torch"], bench.Settings(iters=2, warmup=1, repeats=1), copy_gbps=1.0)


def test_memory_check_names_the_shape_and_the_fix():
    huge = bench.Case("latency", 1, 100_000, 100_000)
    with pytest.raises(bench.BenchError, match=r"B=1 n=100000 C=100000 .* GiB .*pick smaller"):
        bench.check_memory([huge], ["kernels"])
    bench.check_memory([bench.Case("latency", 1, 4, 8)], ["kernels", "reference"])


def test_plot_speedup_png(tmp_path):
    mpl_image = pytest.importorskip("matplotlib.image", reason="matplotlib (the plot extra) is not installed")
    rows = [{"B": 1, "n": 32, "C": C, "dtype": "bfloat16", "pass": "forward", "speedup_vs_reference": s}
            for C, s in ((256, 1.0), (1024, 2.0), (4096, 3.5))]
    path = tmp_path / "speedup.png"
    bench.plot_speedup(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpl_image.imread(str(path))
    assert img.shape[0] > 100 and img.shape[1] > 100


@pytest.mark.parametrize("name", ["kernels", "portable", "reference"])
def test_backward_rows_time_the_vjp_with_dout_as_cotangent(name):
    """A forward+backward row runs the layer's VJP with the case's dout as the output's cotangent
    (no loss formed): its outputs are the forward and the gradients of x and all four parameters."""
    import mlx.core as mx

    from mhc_aot import reference

    case = bench.Case("throughput", 3, 4, 24, "float32", backward=True)
    inp = bench.make_inputs(case)
    (out,), grads = bench.make_runner(name, case, inp).call()
    (want_out,), want = mx.vjp(lambda x, *p: reference.mhc_forward(x, *p), list(inp.args), [inp.dout])
    assert mx.allclose(out, want_out, rtol=1e-4, atol=1e-5).item()
    assert len(grads) == 1 + len(bench.PARAM_NAMES)
    for g, w in zip(grads, want):
        assert g.shape == w.shape and mx.allclose(g, w, rtol=1e-3, atol=1e-4).item()


def test_gpu_cupti_reads_a_batch_of_queued_calls():
    """scripts/gpu_cupti.py (gpu_dynamic_ab.py --gpu-time, gpu_timeline.py) on a synthetic CUPTI trace: two
    calls of a fill and two kernels, a host annotation and a memcpy; the GPU time a call spans the gaps, and a
    kernel that overlaps the one before it (a graph's concurrent branch) has a negative gap, not a hidden one."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_cupti.py"
    spec = importlib.util.spec_from_file_location("gpu_cupti_under_test", path)
    cupti = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cupti)
    k = lambda name, ts, dur, cat="kernel": {"name": name, "ts": ts, "dur": dur, "cat": cat}  # noqa: E731
    trace = [k("batch", 0.0, 900.0, "user_annotation"),
             k("coeffs_pre", 12.0, 150.0), k("fill", 10.0, 2.0), k("post_res", 162.0, 200.0),
             k("fill", 369.0, 2.0), k("coeffs_pre", 371.0, 148.0), k("post_res", 519.0, 198.0),
             k("side", 500.0, 10.0, "gpu_memcpy")]
    events = cupti.gpu_events(trace)
    assert [e["name"] for e in events][:3] == ["fill", "coeffs_pre", "post_res"]  # by start, host range dropped
    assert [g for _, g in cupti.launches(events)] == [0.0, 0.0, 0.0, 7.0, 0.0, -19.0, 0.0]
    assert cupti.span(events) == 717.0 - 10.0
    s = cupti.summary(events, calls=2)
    assert s["span"] == 353.5
    assert s["coeffs_pre"] == 149.0 and s["post_res"] == 199.0 and s["fill"] == 2.0 and s["side"] == 10.0
    assert cupti.per_kernel(events)["post_res"] == [(200.0, 0.0), (198.0, 0.0)]
    spans, durs = cupti.over_rounds([s, {**s, "span": 350.0, "coeffs_pre": 151.0}])  # two rounds' summaries
    assert spans == [350.0, 353.5] and "coeffs_pre 150.0" in durs and "post_res 199.0" in durs
    with pytest.raises(SystemExit, match="no GPU work"):
        cupti.gpu_events([k("batch", 0.0, 1.0, "user_annotation")])
