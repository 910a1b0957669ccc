// Sums the backward's per-CTA partials over CTAs in a fixed order (deterministic, no atomics)
// and applies the activations' derivatives (paper eq. 8):
//   dH_pre_raw = dH_pre * s (1 - s) with s = sigmoid(H_pre_raw)
//   dH_post_raw = dH_post * 2 s (1 - s) with s = sigmoid(H_post_raw)
// partial: [G, n*n + 2n + C] from mhc_backward_fused; partial_dm: [G_dm, n*n] from
// mhc_backward_dm, used for dM when G_dm > 0 (then partial's dM section is ignored).
// A thread owns one output column and walks the G rows (consecutive threads, consecutive
// columns: coalesced).
// Launch: grid (n*n + 2n + C, 1, 1) threads, threadgroup (THREADS, 1, 1).
#include "mhc_common.cuh"

using namespace mhc;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const float* __restrict__ partial, const float* __restrict__ partial_dm, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, float* __restrict__ dM, float* __restrict__ dH_pre_raw,
    float* __restrict__ dH_post_raw, float* __restrict__ dw, int G, int G_dm, int n, int C) {
  const int P = n * n + 2 * n + C;
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= P) return;
  float s = 0.0f;
  if (k < n * n && G_dm > 0) {
    for (int g = 0; g < G_dm; ++g) s += partial_dm[(size_t)g * n * n + k];
  } else {
    for (int g = 0; g < G; ++g) s += partial[(size_t)g * P + k];
  }
  if (k < n * n) {
    dM[k] = s;
  } else if (k < n * n + n) {
    const float sg = sigmoid(H_pre_raw[k - n * n]);
    dH_pre_raw[k - n * n] = s * sg * (1.0f - sg);
  } else if (k < n * n + 2 * n) {
    const float sg = sigmoid(H_post_raw[k - n * n - n]);
    dH_post_raw[k - n * n - n] = s * 2.0f * sg * (1.0f - sg);
  } else {
    dw[k - n * n - 2 * n] = s;
  }
}
