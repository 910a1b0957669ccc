"""Probe (issue 6, docs/HISTORY.md session 37): a kernel in thread block clusters inside MLX's CUDA graphs.
Each part runs in its own process (MLX's graph cache lives as long as the process), with CUDA graphs on
(MLX's default), and evaluates one graph with a cluster kernel, then one with a plain kernel of 3 CTAs at
the same place, a few times:
  A  the cluster kernel through mx.fast.precompiled_cuda_kernel (compile-time __cluster_dims__: the only
     kind that call launches): the graph cache's known failure, the plain kernel launched in clusters of 8
     (its 3 CTAs are not a whole cluster: it does not run, its output keeps its fill value -1)
  B  through cluster_graph.kernel mode 0: a plain kernel node with the cluster shape set at launch
  C  through cluster_graph.kernel mode 1: a child graph whose kernel node carries the cluster shape
  D  (after C's check) mhc_dynamic_proj_cluster through mode 1 in the DynamicMHC forward, graphs on:
     outputs against the three-kernel path, then a same-run timing against it
  python scripts/probes/cluster_graph/probe.py [A B C D]    (after build.sh; each part a child process)
On the device (nothing can be downloaded there; session 37's one call, with .devwheels2 and .probewheels carried):
  pip download nanobind==3.1.0 --no-deps -d .probewheels                  (here, once; .probewheels/ is untracked)
  source .devwheels2/stage2.sh; pip install --no-index --no-deps .probewheels/*.whl
  bash scripts/probes/cluster_graph/build.sh; python3 scripts/probes/cluster_graph/probe.py A B C
  MHC_VALIDATE=0 bash scripts/gpu_check.sh build; python3 scripts/probes/cluster_graph/probe.py D
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def part(name: str) -> None:
    import mlx.core as mx

    sys.path.insert(0, str(HERE / "build"))
    ct, rt = ((HERE / "build" / f).read_bytes() for f in ("kernels_ct.cubin", "kernels_rt.cubin"))
    dummy = mx.zeros((1,))

    def plain():
        return mx.fast.precompiled_cuda_kernel(
            name="plain_fill", compiled_source=rt, inputs=[dummy], output_shapes=[(3,)], output_dtypes=[mx.float32],
            scalars=[], grid=(3 * 32, 1, 1), threadgroup=(32, 1, 1), init_value=-1.0)[0]

    def cluster():
        if name == "A":
            return mx.fast.precompiled_cuda_kernel(
                name="cl_fill", compiled_source=ct, inputs=[dummy], output_shapes=[(8,)], output_dtypes=[mx.float32],
                scalars=[], grid=(8 * 32, 1, 1), threadgroup=(32, 1, 1), init_value=-1.0)[0]
        import cluster_graph

        return cluster_graph.kernel("cl_fill", rt, [dummy], [[8]], [mx.float32], [], [], [8, 1, 1], [32, 1, 1], 8, 0,
                                    0 if name == "B" else 1)[0]

    want_c, want_p = [100.0 + r for r in range(8)], [0.0, 1.0, 2.0]
    bad = 0
    for i in range(4):
        c = cluster()
        mx.eval(c)
        p = plain()
        mx.eval(p)
        gc, gp = c.tolist(), p.tolist()
        ok = gc == want_c and gp == want_p
        bad += not ok
        print(f"PART {name} round {i}: cluster kernel {gc} plain kernel {gp} {'ok' if ok else 'WRONG'}", flush=True)
    print(f"PART {name}: {'all rounds right' if bad == 0 else f'{bad} of 4 rounds wrong'}", flush=True)


def part_d() -> None:
    import time

    import mlx.core as mx
    import numpy as np

    sys.path.insert(0, str(HERE / "build"))
    sys.path.insert(0, str(HERE.parents[2]))
    import cluster_graph
    from mhc_aot import bench, cuda_dynamic, dispatch, kernel_ops

    cubin = (HERE / "build" / "proj_cluster_rt.cubin").read_bytes()

    def proj_cluster(x3, phi, b32, ap, cfg, clusters):  # as cuda_dynamic._proj_cluster, through mode 1
        T, n, C = x3.shape
        M = n * n + 2 * n
        tmpl = cuda_dynamic._x_tile_map(T, n, C, cuda_dynamic.PC_BOXC, cuda_dynamic.PC_TT)
        P = clusters * 8
        outs = cluster_graph.kernel("proj_cluster_rt", cubin, [x3, tmpl, phi, b32, ap],
                                    [[T, C], [1, T, M], [1, T], [P * 32]], [x3.dtype, mx.float32, mx.float32, mx.uint32],
                                    [n, C, T], [cfg.rms_eps, cfg.pre_eps], [P, 1, 1], [512, 1, 1], 8,
                                    cuda_dynamic.PC_SMEM_BYTES, 1)
        return outs[0], outs[1], outs[2]

    def use(on: bool, clusters: int = 15):
        cuda_dynamic.PROJ_CLUSTER, cuda_dynamic.PC_CLUSTERS = on, clusters
        cuda_dynamic.CP_MIN_T = None  # "three": the three kernels, not the one-read kernel's rule (session 38)
        kernel_ops._compiled.cache_clear()
        cuda_dynamic._coeffs_fn.cache_clear()

    cuda_dynamic._proj_cluster = proj_cluster
    dispatch.cuda_graphs = lambda: False  # the rule's graphs check: this path is safe with graphs on
    print(f"PART D: MLX graphs on: {int(__import__('os').environ.get('MLX_USE_CUDA_GRAPHS', '1')) != 0}", flush=True)
    from mhc_aot import dynamic, testing
    rng = np.random.default_rng(0)

    def small_three():  # the three-kernel path on 37 tokens, outputs NaN-poisoned before launch
        use(False)
        xs = mx.array(np.random.default_rng(1).standard_normal((37, 4, 4096)).astype(np.float32)).astype(mx.bfloat16)
        ps = mx.array((np.random.default_rng(2).standard_normal((4 * 4096, 24)) * 0.01).astype(np.float32)).astype(mx.bfloat16)
        with testing.poisoned_outputs():
            o = dynamic.mhc_coeffs_pre(xs, ps, mx.zeros((24,)), mx.array([1.0]), mx.array([1.0]), mx.array([1.0]))
            mx.eval(o)
        return [np.array(v.astype(mx.float32)) for v in o]

    before = small_three()
    for T in (8192, 1000):
        n, C = 4, 4096
        x = mx.array(rng.standard_normal((T, n, C)).astype(np.float32)).astype(mx.bfloat16)
        M = n * n + 2 * n
        phi = mx.array((rng.standard_normal((n * C, M)) * 0.01).astype(np.float32)).astype(mx.bfloat16)
        b = mx.array((rng.standard_normal(M) * 0.1).astype(np.float32))
        a = [mx.array([0.8]), mx.array([0.9]), mx.array([1.1])]
        outs = {}
        for on in (True, False, True):
            use(on)
            o = dynamic.mhc_coeffs_pre(x, phi, b, *a)
            mx.eval(o)
            outs.setdefault(on, []).append([np.array(v.astype(mx.float32)) for v in o])
        for k, nm in enumerate(("h_pre", "h_post", "h_res", "x_in")):
            d = float(np.max(np.abs(outs[True][0][k] - outs[False][0][k])))
            same = all(np.array_equal(outs[True][0][k], outs[True][1][k]) for _ in [0])
            print(f"PART D T={T}: {nm} max |cluster - three| {d:.2e}, the two cluster runs equal: {same}", flush=True)
    for T in (8192, 4096, 16384):
        res = {True: [], False: []}
        for rnd in range(3):
            for on in ((True, False) if rnd % 2 == 0 else (False, True)):
                use(on)
                case = bench.Case("throughput", T, 4, 4096, "bfloat16", False, layer="dynamic", phi_dtype="bfloat16")
                runner = bench.make_runner("kernels", case, bench.make_inputs(case))
                res[on].append(bench.time_runner(runner, "throughput", 30, 5, repeats=5).median_us)
        for on, v in res.items():
            print(f"PART D AB fwd {T},4,4096 {'cluster (graphs on)' if on else 'three':20s} "
                  f"{' '.join(f'{m:7.1f}' for m in sorted(v))}", flush=True)
    # after the cluster path ran with graphs on: the ordinary kernels give what they gave before it ran
    after = small_three()
    same = all(np.array_equal(u, v) for u, v in zip(before, after))
    print(f"PART D: the three-kernel path on 37 tokens (poisoned outputs) after the cluster runs: "
          f"{'bit-equal to before' if same else 'DIFFERENT from before'}; finite: {all(np.isfinite(v).all() for v in after)}",
          flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--part":
        part_d() if sys.argv[2] == "D" else part(sys.argv[2])
        sys.exit(0)
    for p in sys.argv[1:] or ["A", "B", "C", "D"]:
        r = subprocess.run([sys.executable, __file__, "--part", p], capture_output=True, text=True, timeout=400)
        print(r.stdout, end="")
        if r.returncode:
            print(f"PART {p}: exit {r.returncode}\n{r.stderr[-2500:]}", flush=True)
