// Sums the backward's per-CTA partials over CTAs in a fixed order (deterministic, no atomics)
// and applies the activations' derivatives (paper eq. 8):
//   dH_pre_raw = dH_pre * s (1 - s) with s = sigmoid(H_pre_raw)
//   dH_post_raw = dH_post * 2 s (1 - s) with s = sigmoid(H_post_raw)
// partial: [G, n*n + 2n + C] from mhc_backward_fused / _resident; partial_dm: [G_dm, n*n] from
// mhc_backward_dm, used for dM when G_dm > 0 (then partial's dM section is ignored, and partial_dm
// may be any array when G_dm == 0).
// A CTA owns COLS consecutive output columns (a warp's lanes: coalesced rows) and splits the G
// rows among its SLICES warps (warp s sums rows s, s + SLICES, ... in order); warp 0 then adds the
// slices in order. Why: a thread walking all G rows alone (264 at (4096, 4, 4096) on the H100)
// left 17 CTAs busy for 17 us on the backward's critical path.
// Launch: grid (ceil(P / COLS) * THREADS, 1, 1) threads with P = n*n + 2n + C, threadgroup
// (THREADS, 1, 1), shared SLICES * (COLS + 1) floats.
#include "mhc_common.cuh"

using namespace mhc;

constexpr int COLS = 32, SLICES = THREADS / COLS;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const float* __restrict__ partial, const float* __restrict__ partial_dm, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, float* __restrict__ dM, float* __restrict__ dH_pre_raw,
    float* __restrict__ dH_post_raw, float* __restrict__ dw, int G, int G_dm, int n, int C) {
  extern __shared__ float smem[];  // slice sums [SLICES][COLS + 1]
  const int P = n * n + 2 * n + C;
  const int lane = threadIdx.x % COLS, slice = threadIdx.x / COLS;
  const int k = blockIdx.x * COLS + lane;
  float s = 0.0f;
  if (k < P) {
    const bool dm = k < n * n && G_dm > 0;
    const float* src = dm ? partial_dm + k : partial + k;
    const size_t stride = dm ? (size_t)n * n : (size_t)P;
    const int rows = dm ? G_dm : G;
#pragma unroll 4
    for (int g = slice; g < rows; g += SLICES) s += src[(size_t)g * stride];
  }
  smem[slice * (COLS + 1) + lane] = s;
  __syncthreads();
  if (slice != 0 || k >= P) return;
  s = 0.0f;
#pragma unroll
  for (int q = 0; q < SLICES; ++q) s += smem[q * (COLS + 1) + lane];
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
