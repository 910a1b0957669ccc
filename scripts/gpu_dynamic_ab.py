"""Same-run A/B of the dynamic layer's coefficients + x_in on the GPU: mhc_dynamic_coeffs_pre (x read
once, one persistent launch) against the three-kernel path it replaces (projection, coefficients,
pre), DynamicMHC around an identity F as `mhc bench --layer dynamic` times it (queued throughput
mode), alternating the order over rounds. Run-to-run spread on the device is larger than many
differences worth measuring, so both run inside one process.

  python scripts/gpu_dynamic_ab.py              # forward
  python scripts/gpu_dynamic_ab.py backward     # forward + backward

Prints one line per (config, path): the sorted medians of the rounds (us).
"""

from __future__ import annotations

import sys

from mhc_aot import bench, cuda_dynamic, kernel_ops

CONFIGS = [(8192, 4, 4096), (4096, 4, 2048), (16384, 4, 2048), (2048, 4, 4096), (1024, 4, 4096), (8192, 2, 4096),
           (8192, 4, 1024)]


def main(backward: bool = False, rounds: int = 3) -> None:
    default = cuda_dynamic.CP_MIN_T
    paths = (("one-read", default), ("three", 10 ** 9))
    for T, n, C in CONFIGS:
        res: dict[str, list[float]] = {tag: [] for tag, _ in paths}
        for rnd in range(rounds):
            for tag, min_t in (paths if rnd % 2 == 0 else paths[::-1]):
                cuda_dynamic.CP_MIN_T = min_t
                # the path is chosen when a graph is traced: no cached trace of the other one replays
                kernel_ops._compiled.cache_clear()
                cuda_dynamic._coeffs_fn.cache_clear()
                case = bench.Case("throughput", T, n, C, "bfloat16", backward, layer="dynamic")
                runner = bench.make_runner("kernels", case, bench.make_inputs(case))
                res[tag].append(bench.time_runner(runner, "throughput", 30, 5, repeats=5).median_us)
        for tag, medians in res.items():
            print(f"AB dynamic {'fwd+bwd' if backward else 'fwd'} {T},{n},{C} {tag:8s} "
                  f"{' '.join(f'{m:7.1f}' for m in sorted(medians))}", flush=True)
    cuda_dynamic.CP_MIN_T = default


if __name__ == "__main__":
    main(backward=sys.argv[1:2] == ["backward"])
