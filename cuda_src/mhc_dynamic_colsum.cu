// out_a[i] = sum_{r < Ra} part_a[r, i] for part_a [Ra, Na] float32, and the same for b, in one
// launch (Nb = 0: a alone): the deterministic reduce of per-CTA / per-token partials (dphi over
// splits, then db and dalpha over tokens; one launch fewer per backward, which is what counts at
// small T).
// cta_per_col = 0: one thread per column, rows summed in order (R small: the split count).
// cta_per_col = 1: one CTA per column, a block reduction over rows (R large: the token count).
// Grid (threads): (CTAs of a + CTAs of b) * THREADS, a problem's CTAs being ceil(N / THREADS)
// or N (cta_per_col); a's come first.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

__device__ __forceinline__ int colsum_ctas(int N, int cta_per_col) { return cta_per_col ? N : (N + THREADS - 1) / THREADS; }

__device__ __forceinline__ void colsum(const float* __restrict__ part, float* __restrict__ out, int R, int N,
                                       int cta_per_col, int cta, float* scratch) {
  if (!cta_per_col) {
    const size_t i = (size_t)cta * THREADS + threadIdx.x;
    if (i >= (size_t)N) return;
    float s = 0.0f;
    for (int r = 0; r < R; ++r) s += part[(size_t)r * N + i];
    out[i] = s;
    return;
  }
  float s = 0.0f;
  for (int r = threadIdx.x; r < R; r += THREADS) s += part[(size_t)r * N + cta];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[cta] = s;
}

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const float* __restrict__ part_a, const float* __restrict__ part_b, float* __restrict__ out_a,
    float* __restrict__ out_b, int Ra, int Na, int cta_a, int Rb, int Nb, int cta_b) {
  __shared__ float scratch[32];
  const int ga = colsum_ctas(Na, cta_a);
  if ((int)blockIdx.x < ga) {
    colsum(part_a, out_a, Ra, Na, cta_a, blockIdx.x, scratch);
  } else {
    colsum(part_b, out_b, Rb, Nb, cta_b, blockIdx.x - ga, scratch);
  }
}
