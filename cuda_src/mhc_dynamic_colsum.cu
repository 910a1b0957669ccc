// out[i] = sum_{r < R} part[r, i] for part [R, N] float32: the deterministic reduce of per-CTA /
// per-token partials (dphi over splits, db and dalpha over tokens).
// cta_per_col = 0: one thread per column, rows summed in order (R small: the split count).
// cta_per_col = 1: one CTA per column, a block reduction over rows (R large: the token count).
// Grid (threads): (ceil(N / THREADS) * THREADS, 1, 1) or (N * THREADS, 1, 1).
#include "mhc_dynamic_common.cuh"

using namespace mhc;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const float* __restrict__ part, float* __restrict__ out, int R, int N, int cta_per_col) {
  if (!cta_per_col) {
    const size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x;
    if (i >= (size_t)N) return;
    float s = 0.0f;
    for (int r = 0; r < R; ++r) s += part[(size_t)r * N + i];
    out[i] = s;
    return;
  }
  __shared__ float scratch[32];
  const int i = blockIdx.x;
  float s = 0.0f;
  for (int r = threadIdx.x; r < R; r += THREADS) s += part[(size_t)r * N + i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[i] = s;
}
