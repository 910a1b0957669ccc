// mhc_coeffs for few tokens in one launch (n <= 4): a CTA per token projects its own token,
// z = vec(x_t) @ phi and the sum of squares, then runs mhc_dynamic_coeffs's CTA mode on them (RMS
// scale, activations, Liger's Sinkhorn, with_pre: x_in). Few tokens are host-bound: the three-kernel
// path (phi_split, proj_tc, coeffs, and a cast of a bfloat16 phi to float32 before them) costs the host
// a launch each (scripts/dynamic_host_probe.py, H200, T = 32, n = 4, C = 4096: ~14-20 us of async_eval
// per kernel) while its GPU work is ~10 us. Here phi is read in its own dtype (phi_kind), once per
// token from L2: T x n C x M values, which is why this is for few tokens only (PROJ_MAX_T and
// PROJ_PHI_BYTES in mhc_aot/cuda_dynamic.py).
//
// The projection: the token is staged in shared memory (its sum of squares taken on the way); a row of phi
// is cpr chunks of V values (16-byte loads: V = 4 float32 or 8 bfloat16 / float16 values when M % V == 0
// and phi is 16-byte aligned, else V = 1). Thread r of the first `active` = R cpr threads (R = THREADS /
// cpr rows a sweep) owns chunk slot r % cpr of rows r / cpr, r / cpr + R, ...: its chunks are the flat
// chunks r, r + active, ... of phi, so a warp's loads are consecutive 16 bytes and a thread's counters
// advance by constant steps (no division in the loop). Each thread keeps V sums; then z[m] sums the
// partials of the R threads of slot m / V, a warp per entry.
// Grid (threads): (T * THREADS, 1, 1), block THREADS. Shared memory (dynamic): coeff floats (M + n n +
// n + max(sinkhorn_floats(n, tmax, 2), 32 WARPS), rounded up to 4), then THREADS * PV floats of
// partials, then the token (n C values of MHC_DTYPE): proj_smem_bytes in mhc_aot/cuda_dynamic.py.
// Inputs: x [T, n, C], phi [n C, M] (float32, bfloat16 or float16, phi_kind 0 / 1 / 2), b [M],
// alpha_pre, alpha_post, alpha_res (float32 scalars). Outputs as mhc_dynamic_coeffs: h_pre [T, n],
// h_post [T, n], h_res [T, n, n], x_in [T, C] (or [1] if !with_pre), mix [T, M], invr [T].
#include "mhc_dynamic_coeffs.cuh"

using namespace mhc;

namespace {
constexpr int PV = 8;  // sums a thread keeps at most (a 16-byte chunk of a 2-byte phi)
// A thread's 16-byte loads come in groups of U, double-buffered: the next group in flight while this
// one's products run. ncu, H200, n = 4, C = 4096, bfloat16 phi, us at T = 32 / 256 (512, 4, 2048):
// U = 8 single-buffered 34.9 / 71.6 (43.1), U = 4 double-buffered 33.9 / 51.1 (45.1), U = 8 double
// 26.6 / 59.0 (73.8; 124 registers: fewer CTAs an SM once T exceeds the SMs). Session 29's version
// (a cp.async ring, 64-bit counters and a 64-bit division a chunk to find its row) took 104 us at
// T = 32, issue-bound at 29.5 k instructions a thread against ~6.5 k now (docs/HISTORY.md)
constexpr int U = 4;

// z[m] of the staged token xs (K values in shared memory) against phi [K, M] in chunks of V values of P.
// rot: where this CTA starts in its threads' chunks (CTAs that walk phi in step ask the same L2 lines at
// once). 32-bit counters: K cpr < 2^31 for any token that fits shared memory.
template <int V, typename P>
__device__ __forceinline__ void project(const T* xs, const P* __restrict__ phi, int K, int M, float* part,
                                        int rot, float* z) {
  const int cpr = M / V, R = THREADS / cpr, active = R * cpr;
  const int r = threadIdx.x, k0 = r / cpr, slot = r % cpr;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
  if (r < active) {
    if constexpr (V == 1) {
#pragma unroll 4
      for (int k = k0; k < K; k += R) acc[0] += to_float(xs[k]) * to_float(phi[(size_t)k * M + slot]);
    } else {
      const uint4* src = reinterpret_cast<const uint4*>(phi) + r;  // chunk i: src[i active], row k0 + i R
      const T* xk = xs + k0;
      const int mine = k0 < K ? (K - k0 + R - 1) / R : 0;
      const int G = mine / U, g0 = G > 0 ? rot % G : 0;
      auto first = [&](int g) { return (g + g0 < G ? g + g0 : g + g0 - G) * U; };
      auto load = [&](uint4 (&c)[U], int g) {
#pragma unroll
        for (int u = 0; u < U; ++u) c[u] = __ldg(src + (first(g) + u) * active);
      };
      auto fma_chunk = [&](const uint4& c, int i) {  // chunk i (row k0 + i R) times its x value
        const float xv = to_float(xk[i * R]);
        float p[V];
        widen_vec<P>(c, p);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += xv * p[e];
      };
      auto use = [&](const uint4 (&c)[U], int g) {
        const int i0 = first(g);
#pragma unroll
        for (int u = 0; u < U; ++u) fma_chunk(c[u], i0 + u);
      };
      // two groups of U loads: the next group's in flight while this one's products run
      uint4 c0[U], c1[U];
      if (G > 0) load(c0, 0);
      int g = 0;
      for (; g + 1 < G; g += 2) {
        load(c1, g + 1);
        use(c0, g);
        if (g + 2 < G) load(c0, g + 2);
        use(c1, g + 1);
      }
      if (g < G) use(c0, g);
      for (int i = G * U; i < mine; ++i) fma_chunk(__ldg(src + i * active), i);  // the ragged tail
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) part[r * V + i] = r < active ? acc[i] : 0.0f;
  __syncthreads();
  // z[m]: warp w sums entries w, w + WARPS, ..., its lanes over the R threads of slot m / V
  const int lane = threadIdx.x & 31;
  for (int m = threadIdx.x >> 5; m < M; m += dyn::WARPS) {
    const int s = m / V, i = m % V;
    float v = 0.0f;
    for (int j = lane; j < R; j += 32) v += part[(s + j * cpr) * V + i];
    v = warp_sum(v);
    if (lane == 0) z[m] = v;
  }
  __syncthreads();
}

template <typename P>
__device__ __forceinline__ void project_any(const T* xs, const void* phi, int K, int M, float* part, int rot,
                                            float* z) {
  const P* p = static_cast<const P*>(phi);
  constexpr int V = Vec<P>::N;
  if (M % V == 0 && (reinterpret_cast<uintptr_t>(phi) & 15) == 0)
    project<V, P>(xs, p, K, M, part, rot, z);
  else
    project<1, P>(xs, p, K, M, part, rot, z);
}

// token_coeffs's z for the CTA: the token staged in shared memory with its sum of squares, then the
// projection. (Read from global memory instead, the token left L1 under phi's stream, and each stage's
// products waited on an L2 round trip: ncu, H200, T = 32: 98.6 us)
struct CtaProjection {
  const T* x;
  const void* phi;
  int phi_kind, K;
  float* part;  // THREADS * PV floats
  T* xs;        // K values
  __device__ __forceinline__ void operator()(float* mixs, float* hp, float* red, int t, int M, const float*,
                                             const float*, int, int) const {
    const T* xt = x + (size_t)t * K;
    float ss = 0.0f;
    constexpr int V = Vec<T>::N;
    if (K % V == 0 && (reinterpret_cast<uintptr_t>(xt) & 15) == 0) {
      for (int v = threadIdx.x; v < K / V; v += THREADS) {
        const uint4 raw = ldg_vec(xt + v * V);
        *reinterpret_cast<uint4*>(xs + v * V) = raw;
        float e[V];
        widen_vec<T>(raw, e);
#pragma unroll
        for (int i = 0; i < V; ++i) ss += e[i] * e[i];
      }
    } else {
      for (int k = threadIdx.x; k < K; k += THREADS) {
        const T e = xt[k];
        xs[k] = e;
        ss += to_float(e) * to_float(e);
      }
    }
    ss = block_sum(ss, red);  // ends synchronised: xs is complete
    if (threadIdx.x == 0) hp[0] = ss;
    const int rot = t * 7;
    if (phi_kind == 1)
      project_any<bf16>(xs, phi, K, M, part, rot, mixs);
    else if (phi_kind == 2)
      project_any<f16>(xs, phi, K, M, part, rot, mixs);
    else
      project_any<float>(xs, phi, K, M, part, rot, mixs);
  }
};
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const void* __restrict__ phi, const float* __restrict__ b,
    const float* __restrict__ alpha_pre, const float* __restrict__ alpha_post, const float* __restrict__ alpha_res,
    float* __restrict__ h_pre, float* __restrict__ h_post, float* __restrict__ h_res, T* __restrict__ x_in,
    float* __restrict__ mix, float* __restrict__ invr_out,
    int n, int C, int Tn, int tmax, float rms_eps, float pre_eps, float sinkhorn_eps, float post_mult,
    int with_pre, int phi_kind) {
  extern __shared__ float smem[];
  const int M = n * n + 2 * n;
  const int sk = dyn::sinkhorn_floats(n, tmax, 2);
  const int coeff = (M + n * n + n + (sk > 32 * dyn::WARPS ? sk : 32 * dyn::WARPS) + 3) / 4 * 4;
  float* part = smem + coeff;
  T* xs = reinterpret_cast<T*>(part + THREADS * PV);
  const int t = blockIdx.x;
  dyn::token_coeffs(dyn::CtaGroup{}, smem, t, x, nullptr, nullptr, b, *alpha_pre, *alpha_post, *alpha_res, h_pre,
                    h_post, h_res, x_in, mix, invr_out, n, C, Tn, 0, tmax, rms_eps, pre_eps, sinkhorn_eps, post_mult,
                    with_pre != 0, CtaProjection{x, phi, phi_kind, n * C, part, xs});
}
