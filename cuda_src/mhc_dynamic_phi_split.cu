// phi [K, M] float32 -> mhc_dynamic_proj_tc's B fragments, once per forward:
//   frag[((kk NT + nt) 3 + p) 32 + lane] = term p of the four phi values lane holds in k16 step kk
//   and n8 tile nt (mma::BStage's layout: rows 16 kk + 2 q, + 1, + 8, + 9 of column 8 nt + g, each
//   split as hi + mid + lo, three bfloat16 register pairs; zeros from row K and column M on),
// for STEPS = ceil(K / 64) * 4 k16 steps, so each 64-row chunk of the projection is one contiguous
// block of 4 NT 3 32 uint2 (9216 bytes) that proj_tc copies with its x tile. Every proj_tc CTA
// loaded and split its chunks itself before (the same chunks in every token tile: ncu, H200, T = 8192,
// n = 4, 16 us of the forward when timed without it).
// Grid (threads): (STEPS * NT * 32, 1, 1), a thread per (step, tile, lane). No dtype: phi is float32.
#include "mhc_dynamic_common.cuh"
#include "mhc_dynamic_mma.cuh"

using namespace mhc;

namespace {
constexpr int NT = 3;  // n8 tiles: M <= 24 (mhc_dynamic_proj_tc)
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(const float* __restrict__ phi, uint2* __restrict__ frag,
                                                              int K, int M, int steps) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= steps * NT * 32) return;
  const int l = e % 32, nt = (e / 32) % NT, kk = e / (32 * NT);
  const int m = nt * 8 + l / 4, r0 = kk * 16 + 2 * (l % 4);
  float v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = r0 + (j & 1) + 8 * (j >> 1);
    v[j] = (m < M && r < K) ? phi[(size_t)r * M + m] : 0.0f;
  }
  uint2 terms[3];
  mma::split_b_fragment(v, terms);
#pragma unroll
  for (int p = 0; p < 3; ++p) frag[((size_t)(kk * NT + nt) * 3 + p) * 32 + l] = terms[p];
}
