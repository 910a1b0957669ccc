// phi [K, M] (float32, bfloat16 or float16: phi_kind) -> mhc_dynamic_proj_tc's B fragments, once per
// forward:
//   frag[((kk NT + nt) terms + p) 32 + lane] = term p of the four phi values lane holds in k16 step kk
//   and n8 tile nt (mma::BStage's layout: rows 16 kk + 2 q, + 1, + 8, + 9 of column 8 nt + g, each
//   split as hi + mid + lo, three bfloat16 register pairs, or, with terms = 1 for a bfloat16 phi, hi
//   alone, which is then phi exactly; zeros from row K and column M on),
// for STEPS = ceil(K / 64) * 4 k16 steps, so each 64-row chunk of the projection is one contiguous
// block of 4 NT terms 32 uint2 (9216 bytes, 3072 with one term) that proj_tc copies with its x tile. Every proj_tc CTA
// loaded and split its chunks itself before (the same chunks in every token tile: ncu, H200, T = 8192,
// n = 4, 16 us of the forward when timed without it).
// In the same launch it copies the alphas and b into consts = [alpha_pre, alpha_post, alpha_res, b[0..M)],
// an ordinary device array that mhc_dynamic_coeffs and mhc_dynamic_coeffs_bwd read instead: MLX keeps
// arrays of <= 8 bytes (each alpha) in a managed, read-mostly pool, and every coefficients CTA loading
// them from there waited (ncu, H100, T = 8192, n = 4: coefficients 25-30 us with the alphas' own arrays,
// 11-12 with an ordinary array; docs/HISTORY.md, session 18).
// Here 3 + M threads of the first CTA load them once.
// Grid (threads): (STEPS * NT * 32, 1, 1), a thread per (step, tile, lane); STEPS * NT * 32 >= 3 + M.
// No dtype: phi is read in its own (phi_kind), so a bfloat16 phi needs no float32 copy first (its cast
// was a launch of its own before every forward: ~3.5 us at n = 4, C = 4096 on the H200, session 33).
#include "mhc_dynamic_common.cuh"
#include "mhc_dynamic_mma.cuh"

using namespace mhc;

namespace {
constexpr int NT = 3;  // n8 tiles: M <= 24 (mhc_dynamic_proj_tc)
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const void* __restrict__ phi, const float* __restrict__ b, const float* __restrict__ alpha_pre,
    const float* __restrict__ alpha_post, const float* __restrict__ alpha_res, uint2* __restrict__ frag,
    float* __restrict__ consts, int K, int M, int steps, int terms, int phi_kind) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  dyn::write_consts(consts, e, M, alpha_pre, alpha_post, alpha_res, b);
  if (e >= steps * NT * 32) return;
  const int l = e % 32, nt = (e / 32) % NT, kk = e / (32 * NT);
  const int m = nt * 8 + l / 4, r0 = kk * 16 + 2 * (l % 4);
  float v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = r0 + (j & 1) + 8 * (j >> 1);
    v[j] = (m < M && r < K) ? dyn::phi_at(phi, phi_kind, (size_t)r * M + m) : 0.0f;
  }
  uint2 split[3];
  mma::split_b_fragment(v, split);
  for (int p = 0; p < terms; ++p) frag[((size_t)(kk * NT + nt) * terms + p) * 32 + l] = split[p];
}
