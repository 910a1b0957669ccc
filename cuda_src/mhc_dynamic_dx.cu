// dx of the coefficients (and pre) path, token-tiled (mhc_mm_norm_bwd, src/liger_kernel/ops/
// mhc.py:291-295, plus LigerMHCPreFunction's grad_x):
//   dx[t, k] = sum_m dz[t, m] phi[k, m] + factor[t] x[t, k] + (has_pre ? h_pre[t, k / C] dx_in[t, k % C] : 0)
// with dz, factor from mhc_dynamic_coeffs_bwd. A [T, M] x [M, K] product with a short reduction:
// CTA tile TT tokens x KB k's, M staged through shared memory MC at a time, each thread 4 x 4.
// Inputs: x [T, K], dz [T, M], phi [K, M] (float32), factor [T], h_pre [T, n], dx_in [T, C] (or [1]).
// Output: dx [T, K] (MHC_DTYPE). Grid (threads): (ceil(K / KB) * THREADS, ceil(T / TT), 1).
#include "mhc_dynamic_common.cuh"

using namespace mhc;

namespace {
constexpr int TT = 64, KB = 64, MC = 32, PAD = 4;
}

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ dz, const float* __restrict__ phi,
    const float* __restrict__ factor, const float* __restrict__ h_pre, const T* __restrict__ dx_in,
    T* __restrict__ dx, int Tn, int K, int M, int C, int n, int has_pre) {
  __shared__ __align__(16) float Zs[MC][TT + PAD];  // Zs[m][t]
  __shared__ __align__(16) float Ps[MC][KB + PAD];  // Ps[m][k]
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int k0 = blockIdx.x * KB, t0 = blockIdx.y * TT;
  float acc[4][4] = {};
  for (int m0 = 0; m0 < M; m0 += MC) {
    __syncthreads();
    for (int e = tid; e < MC * TT; e += THREADS) {
      const int mm = e % MC, tt = e / MC, m = m0 + mm, tk = t0 + tt;
      Zs[mm][tt] = (m < M && tk < Tn) ? dz[(size_t)tk * M + m] : 0.0f;
    }
    for (int e = tid; e < MC * KB; e += THREADS) {
      const int mm = e % MC, kk = e / MC, m = m0 + mm, k = k0 + kk;
      Ps[mm][kk] = (m < M && k < K) ? phi[(size_t)k * M + m] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int mm = 0; mm < MC; ++mm) {
      const float4 a = *reinterpret_cast<const float4*>(&Zs[mm][ty * 4]);
      const float4 p = *reinterpret_cast<const float4*>(&Ps[mm][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, pv[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][q] += av[i] * pv[q];
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int tk = t0 + ty * 4 + i;
    if (tk >= Tn) continue;
    const float fac = factor[tk];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int k = k0 + tx * 4 + q;
      if (k >= K) continue;
      float v = acc[i][q] + to_float(x[(size_t)tk * K + k]) * fac;
      if (has_pre) v += h_pre[(size_t)tk * n + k / C] * to_float(dx_in[(size_t)tk * C + k % C]);
      dx[(size_t)tk * K + k] = from_float<T>(v);
    }
  }
}
