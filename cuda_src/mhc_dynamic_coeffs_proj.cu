// mhc_coeffs for few tokens in one launch (n <= 4): a CTA per token projects its own token,
// z = vec(x_t) @ phi and the sum of squares, then runs mhc_dynamic_coeffs's CTA mode on them (RMS
// scale, activations, Liger's Sinkhorn, with_pre: x_in). Few tokens are host-bound: the three-kernel
// path (phi_split, proj_tc, coeffs, and a cast of a bfloat16 phi to float32 before them) costs the host
// a launch each (scripts/dynamic_host_probe.py, H200, T = 32, n = 4, C = 4096: ~14-20 us of async_eval
// per kernel) while its GPU work is ~10 us. Here phi is read in its own dtype (phi_kind), once per
// token from L2: T x n C x M values, which is why this is for few tokens only (PROJ_MAX_T in
// mhc_aot/cuda_dynamic.py).
//
// The projection: the token is staged in shared memory (its sum of squares taken on the way), then
// thread r of the first `active` = (THREADS / cpr) cpr threads owns chunk slot r % cpr of every row
// k = r / cpr, r / cpr + active / cpr, ... of phi, where a row's M values are cpr chunks of V (16-byte
// loads: V = 4 float32 or 8 bfloat16 / float16 values when M % V == 0 and phi is 16-byte aligned, else
// V = 1): consecutive threads read consecutive 16 bytes of phi (through a cp.async ring, see U and nst),
// and each thread keeps V sums. Then z[m] sums the partial of every thread of slot m / V in thread order.
// Grid (threads): (T * THREADS, 1, 1), block THREADS. Shared memory (dynamic): coeff floats (M + n n +
// n + max(sinkhorn_floats(n, tmax, 2), 32 WARPS), rounded up to 4), then THREADS * PV floats of
// partials, the token (n C values of MHC_DTYPE, rounded up to 16 bytes), then phi's ring (nst U THREADS
// 16-byte chunks): proj_stages in mhc_aot/cuda_dynamic.py.
// Inputs: x [T, n, C], phi [n C, M] (float32, bfloat16 or float16, phi_kind 0 / 1 / 2), b [M],
// alpha_pre, alpha_post, alpha_res (float32 scalars). Outputs as mhc_dynamic_coeffs: h_pre [T, n],
// h_post [T, n], h_res [T, n, n], x_in [T, C] (or [1] if !with_pre), mix [T, M], invr [T].
#include <cuda_pipeline.h>

#include "mhc_dynamic_coeffs.cuh"
#include "mhc_dynamic_mma.cuh"

using namespace mhc;

namespace {
constexpr int PV = 8;  // sums a thread keeps at most (a 16-byte chunk of a 2-byte phi)
// phi's 16-byte chunks stream through a private cp.async ring per thread: stage j holds the thread's
// chunks j U .. j U + U - 1 and each thread reads back only what it copied, so no barrier orders them.
// `nst` stages (the launcher's, as shared memory allows: 8 on a 227 KB GPU), (nst - 1) U chunks of every
// thread in flight, 112 KB an SM at nst = 8. It was meant to hide L2 latency and did not help: the kernel
// is issue-bound (ncu, H200, T = 32, n = 4, C = 4096, bfloat16 phi: 103.7 us with the ring, 88.6 with
// 16-byte loads into registers; 29.5 k instructions a thread, the index arithmetic below among them:
// docs/HISTORY.md, session 29)
constexpr int U = 4, NST_MAX = 8;

// z[m] of the staged token xs (K values in shared memory) against phi [K, M] in chunks of V values of P.
// rot: the stage this CTA starts at (CTAs that walk phi in step would ask the same L2 lines at once).
template <int V, typename P>
__device__ __forceinline__ void project(const T* xs, const P* __restrict__ phi, int K, int M, float* part,
                                        uint4* ring, int nst, int rot, float* z) {
  const int cpr = M / V, active = THREADS / cpr * cpr;
  const int r = threadIdx.x, slot = r % cpr;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
  if (r < active) {
    if constexpr (V == 1) {
      const int rstep = active / cpr;
#pragma unroll 4
      for (int k = r / cpr; k < K; k += rstep) acc[0] += to_float(xs[k]) * to_float(phi[(size_t)k * M + slot]);
    } else {
      // the thread's chunks: flat 16-byte chunk c = r + i active of phi (row c / cpr, slot r % cpr)
      const long chunks = (long)K * cpr, mine = r < chunks ? (chunks - r + active - 1) / active : 0;
      const int stages = (int)((mine + U - 1) / U);
      // stage j's chunk u of thread r at ring[((j % nst) U + u) THREADS + r]: a warp's 16-byte reads of
      // one u are consecutive, so they take no bank conflicts
      uint4* my = ring + r;
      // stage j is the thread's stage (j + rot) % stages (the same rotation for every thread of the CTA)
      auto issue = [&](int j) {
        if (j < stages) {
          const int js = (j + rot) % stages;
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const long i = (long)js * U + u;
            if (i < mine)
              __pipeline_memcpy_async(my + (size_t)((j % nst) * U + u) * THREADS,
                                      reinterpret_cast<const uint4*>(phi) + r + i * active, 16);
          }
        }
        __pipeline_commit();  // an empty group past the end keeps the wait's count
      };
      for (int j = 0; j < nst - 1; ++j) issue(j);
      for (int j = 0; j < stages; ++j) {
        issue(j + nst - 1);
        mma::wait_pending<0, NST_MAX - 1>(nst - 1);
        const int js = (j + rot) % stages;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const long i = (long)js * U + u;
          if (i < mine) {
            const float xv = to_float(xs[(r + i * active) / cpr]);
            float p[V];
            widen_vec<P>(my[(size_t)((j % nst) * U + u) * THREADS], p);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] += xv * p[e];
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) part[r * V + i] = r < active ? acc[i] : 0.0f;
  __syncthreads();
  for (int m = threadIdx.x; m < M; m += THREADS) {
    const int s = m / V, i = m % V;
    float v = 0.0f;
    for (int q = s; q < active; q += cpr) v += part[q * V + i];
    z[m] = v;
  }
  __syncthreads();
}

template <typename P>
__device__ __forceinline__ void project_any(const T* xs, const void* phi, int K, int M, float* part, uint4* ring,
                                            int nst, int rot, float* z) {
  const P* p = static_cast<const P*>(phi);
  constexpr int V = Vec<P>::N;
  if (M % V == 0 && (reinterpret_cast<uintptr_t>(phi) & 15) == 0)
    project<V, P>(xs, p, K, M, part, ring, nst, rot, z);
  else
    project<1, P>(xs, p, K, M, part, ring, nst, rot, z);
}

// token_coeffs's z for the CTA: the token staged in shared memory with its sum of squares, then the
// projection. (Read from global memory instead, the token left L1 under phi's stream, and each stage's
// products waited on an L2 round trip: ncu, H200, T = 32: 98.6 us)
struct CtaProjection {
  const T* x;
  const void* phi;
  int phi_kind, K, nst;
  float* part;  // THREADS * PV floats
  T* xs;        // K values
  uint4* ring;  // nst * U * THREADS chunks
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
      project_any<bf16>(xs, phi, K, M, part, ring, nst, rot, mixs);
    else if (phi_kind == 2)
      project_any<f16>(xs, phi, K, M, part, ring, nst, rot, mixs);
    else
      project_any<float>(xs, phi, K, M, part, ring, nst, rot, mixs);
  }
};
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const void* __restrict__ phi, const float* __restrict__ b,
    const float* __restrict__ alpha_pre, const float* __restrict__ alpha_post, const float* __restrict__ alpha_res,
    float* __restrict__ h_pre, float* __restrict__ h_post, float* __restrict__ h_res, T* __restrict__ x_in,
    float* __restrict__ mix, float* __restrict__ invr_out,
    int n, int C, int Tn, int tmax, float rms_eps, float pre_eps, float sinkhorn_eps, float post_mult,
    int with_pre, int phi_kind, int nst) {
  extern __shared__ float smem[];
  const int M = n * n + 2 * n;
  const int sk = dyn::sinkhorn_floats(n, tmax, 2);
  const int coeff = (M + n * n + n + (sk > 32 * dyn::WARPS ? sk : 32 * dyn::WARPS) + 3) / 4 * 4;
  float* part = smem + coeff;
  T* xs = reinterpret_cast<T*>(part + THREADS * PV);
  uint4* ring = reinterpret_cast<uint4*>(reinterpret_cast<char*>(xs) + ((size_t)n * C * sizeof(T) + 15) / 16 * 16);
  const int t = blockIdx.x;
  dyn::token_coeffs(dyn::CtaGroup{}, smem, t, x, nullptr, nullptr, b, *alpha_pre, *alpha_post, *alpha_res, h_pre,
                    h_post, h_res, x_in, mix, invr_out, n, C, Tn, 0, tmax, rms_eps, pre_eps, sinkhorn_eps, post_mult,
                    with_pre != 0, CtaProjection{x, phi, phi_kind, n * C, nst, part, xs, ring});
}
