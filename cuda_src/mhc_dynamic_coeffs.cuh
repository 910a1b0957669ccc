// Per-token coefficients of one token by a group (the CTA or a lane group): the math that
// mhc_dynamic_coeffs (z from the projection's partials) and mhc_dynamic_coeffs_proj (z projected by
// the CTA itself, few tokens) share. Shared-memory layout and outputs as mhc_dynamic_coeffs.cu's header.
#pragma once

#include "mhc_dynamic_common.cuh"

namespace mhc {
namespace dyn {

// The CTA mode's z: the sum of the projection's S partials of z[m] (zpart [S, T, M]) and of the sum of
// squares (sq [S, T]) of token t, into mixs[0, M) and hp[0]; `red`: WARPS x 32 floats of scratch.
// Every thread of the CTA calls it; it ends synchronised.
struct CtaPartials {
  __device__ __forceinline__ void operator()(float* mixs, float* hp, float* red, int t, int M,
                                             const float* __restrict__ zpart, const float* __restrict__ sq,
                                             int Tn, int S) const {
    // per 32 entries: lane l of warp w sums entry q0 + l over splits w, w + WARPS, ... (a split's
    // entries are one coalesced row a warp, the loads independent of the sum, so unrolled they are
    // in flight together), then thread l adds the WARPS sums in warp order. Few tokens come with many
    // splits (T = 32: S = 256); a warp per entry, its lanes over the splits, waited on one L2 load at
    // a time per lane (ncu, H200, T = 32, n = 4, C = 4096: the kernel took 31 us). `red` (WARPS x 32
    // floats) lies where the Sinkhorn's rows go later
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int q0 = 0; q0 <= M; q0 += 32) {
      const int q = q0 + lane;
      float v = 0.0f;
      if (q <= M) {
#pragma unroll 8
        for (int s = warp; s < S; s += WARPS) v += q < M ? zpart[((size_t)s * Tn + t) * M + q] : sq[(size_t)s * Tn + t];
      }
      red[warp * 32 + lane] = v;
      __syncthreads();
      if (threadIdx.x < 32 && q <= M) {
        float u = 0.0f;
        for (int w = 0; w < WARPS; ++w) u += red[w * 32 + lane];
        (q < M ? mixs[q] : hp[0]) = u;  // hp is free until the activations
      }
      __syncthreads();
    }
  }
};

// Token t's coefficients, run by group g (the CTA or a lane group) on `base` (shared memory laid
// out as the header says). with_pre only with the CTA group.
template <class G, class Z = CtaPartials>
__device__ __forceinline__ void token_coeffs(
    G g, float* base, int t, const T* __restrict__ x, const float* __restrict__ zpart, const float* __restrict__ sq,
    const float* __restrict__ b, float a_pre, float a_post, float a_res, float* __restrict__ h_pre,
    float* __restrict__ h_post, float* __restrict__ h_res, T* __restrict__ x_in, float* __restrict__ mix,
    float* __restrict__ invr_out, int n, int C, int Tn, int S, int tmax, float rms_eps, float pre_eps,
    float sinkhorn_eps, float post_mult, bool with_pre, Z zsum = Z()) {
  const int M = n * n + 2 * n;
  float* mixs = base;          // M
  float* L = mixs + M;         // n n residual logits
  float* hp = L + n * n;       // n
  SinkhornSmem sk{hp + n, n, tmax, 2};

  // z and the sum of squares: from the projection's S partials (or, on the CTA, as zsum forms them)
  float ss = 0.0f;
  if constexpr (G::cta) {
    // z (unscaled) into mixs and the sum of squares into hp[0] (hp is free until the activations),
    // the area after hp as scratch (the launcher sizes it for WARPS x 32 floats)
    zsum(mixs, hp, hp + n, t, M, zpart, sq, Tn, S);
    ss = hp[0];
  } else {
    for (int s = 0; s < S; ++s) ss += sq[(size_t)s * Tn + t];
  }
  const float invr = rsqrtf(ss / (float)(n * C) + rms_eps);
  for (int m = g.rank; m < M; m += g.size) {
    float z = 0.0f;
    if constexpr (G::cta) {
      z = mixs[m];
    } else {
      for (int s = 0; s < S; ++s) z += zpart[((size_t)s * Tn + t) * M + m];
    }
    const float v = z * invr;
    mixs[m] = v;
    mix[(size_t)t * M + m] = v;
  }
  if (g.rank == 0) invr_out[t] = invr;
  g.sync();
  for (int j = g.rank; j < n; j += g.size) {
    const float pre = sigmoid(mixs[j] * a_pre + b[j]) + pre_eps;
    hp[j] = pre;
    h_pre[(size_t)t * n + j] = pre;
    h_post[(size_t)t * n + j] = sigmoid(mixs[n + j] * a_post + b[n + j]) * post_mult;
  }
  for (int e = g.rank; e < n * n; e += g.size) L[e] = mixs[2 * n + e] * a_res + b[2 * n + e];
  g.sync();
  if constexpr (G::cta) {
    if (n <= LANE_N) {
      // warp 0 runs the Sinkhorn, a lane per matrix element (both half-warps on this token; the
      // same operations and order as the CTA's, so the same h_res), while the other warps form
      // x_in: the CTA's Sinkhorn, ~40 barrier phases, came after x_in and held every thread
      if (threadIdx.x < 32) {
        const int l16 = threadIdx.x % 16;
        const float P = sinkhorn_forward_lanes(l16 < n * n ? L[l16] : 0.0f, n, tmax, sinkhorn_eps, threadIdx.x);
        if (threadIdx.x < n * n) h_res[(size_t)t * n * n + threadIdx.x] = P;
      } else if (with_pre) {
        aggregate_token<NMAX>(x + (size_t)t * n * C, hp, x_in + (size_t)t * C, n, C, g.rank - 32, g.size - 32);
      }
      return;
    }
    if (with_pre) aggregate_token<NMAX>(x + (size_t)t * n * C, hp, x_in + (size_t)t * C, n, C, g.rank, g.size);
  }
  const float* P = sinkhorn_forward(L, sk, sinkhorn_eps, false, g);
  for (int e = g.rank; e < n * n; e += g.size) h_res[(size_t)t * n * n + e] = P[e];
}

}  // namespace dyn
}  // namespace mhc
