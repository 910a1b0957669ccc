"""Host cost of one precompiled-kernel launch through MLX, by binary size and format (device only).

MLX's CustomKernel::eval_gpu hashes the kernel's whole binary on every launch (std::hash of the
compiled source names its module), so a launch's host cost grows with the binary. This times N
queued launches of the tiny mhc_dynamic_colsum kernel (one CTA) from: its shipped binary (a
compressed fatbin of its cubin), the same with the shared-memory bucket marker that
mhc_aot/cuda.py appends, and padded to larger sizes (trailing bytes, ignored by the loader: the
hash alone grows), each called directly and through mx.compile. Median of batches.
  python scripts/launch_cost.py
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from mhc_aot import cuda, manifest

N, BATCHES = 200, 7


def per_launch_us(binary: bytes, name: str, compiled: bool) -> float:
    part = mx.ones((4, 256))
    mx.eval(part)

    def launch(p):
        return mx.fast.precompiled_cuda_kernel(
            name=name, compiled_source=binary, inputs=[p, p], output_shapes=[(256,), (1,)],
            output_dtypes=[mx.float32, mx.float32], scalars=[4, 256, 0, 0, 0, 0], grid=(256, 1, 1),
            threadgroup=(256, 1, 1))[0]

    if compiled:  # as the layer's ops run: a traced graph replayed, no Python per launch
        launch = mx.compile(launch)
    out = launch(part)
    assert mx.allclose(out, mx.full((256,), 4.0)).item(), "colsum from this binary gave wrong values"
    times = []
    for _ in range(BATCHES):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [launch(part) for _ in range(N)]
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t0) / N * 1e6)
    return statistics.median(times)


def main() -> None:
    v = manifest.find("cuda", "mhc_dynamic_colsum", None, None)
    shipped = v.read(cuda._arch_tag(), verify=True)  # a compressed fatbin (build_tools/cuda.py)
    rows = [("shipped fatbin", shipped), ("fatbin + bucket marker", cuda._bucket_binary(shipped, 68 * 1024))]
    for size in (32 * 1024, 96 * 1024):
        rows.append((f"padded to {size // 1024} KB", shipped + b"\0" * (size - len(shipped))))
    for label, binary in rows:
        print(f"{label:24s} {len(binary):8d} bytes  {per_launch_us(binary, v.name, False):7.2f} us per queued launch, "
              f"{per_launch_us(binary, v.name, True):7.2f} us mx.compile'd")


if __name__ == "__main__":
    main()
