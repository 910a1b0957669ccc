// x_in[t, c] = sum_j h_pre[t, j] x[t, j, c] in float32, stored in MHC_DTYPE: LigerMHCPreFunction
// (src/liger_kernel/ops/mhc.py:878-890) on its own (the layer takes it from mhc_dynamic_coeffs).
// Inputs: x [T, n, C], h_pre [T, n] (float32). Output: x_in [T, C].
// Grid (threads): (T * THREADS, ceil(ceil(C / VEC) / THREADS), 1); each thread one 16-byte
// column vector (VEC columns) of one token. Compile-time NMAX >= n: its n vectors in registers.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ h_pre, T* __restrict__ x_in, int n, int C) {
  __shared__ float hp[64];
  const int t = blockIdx.x;
  const float* h = h_pre + (size_t)t * n;
  if constexpr (NMAX > 0) {
    constexpr int NR = NMAX > 0 ? NMAX : 1;  // (array sizes of the discarded NMAX = 0 branch)
    // The 16-byte path (the whole CTA or none of it): x's vectors are loaded before h_pre, which
    // every thread reads itself (L1 broadcasts), so the token's DRAM reads are in flight at once
    // instead of behind an h_pre load and a barrier (H200, T = 8192: the layer's forward 407.1 vs 411.1 us).
    constexpr int V = Vec<T>::N;
    const int v = blockIdx.y * THREADS + threadIdx.x;
    const T* xt = x + (size_t)t * n * C;
    T* out = x_in + (size_t)t * C;
    if (vec_ok<T>(C, xt, out)) {
      if (v >= C / V) return;
      uint4 xr[NR];
#pragma unroll
      for (int j = 0; j < NMAX; ++j)
        if (j < n) xr[j] = ldg_vec(xt + (size_t)j * C + v * V);
      float hj[NR];
#pragma unroll
      for (int j = 0; j < NMAX; ++j) hj[j] = j < n ? __ldg(h + j) : 0.0f;
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.0f;
#pragma unroll
      for (int j = 0; j < NMAX; ++j) {  // streams 0, 1, ... (Liger's order, as aggregate_token)
        if (j < n) {
          float xv[V];
          widen_vec<T>(xr[j], xv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += xv[e] * hj[j];
        }
      }
      store_vec(out + v * V, acc);
      return;
    }
  }
  const float* hs = h;
  if (n <= 64) {
    for (int j = threadIdx.x; j < n; j += THREADS) hp[j] = h[j];
    __syncthreads();
    hs = hp;
  }
  constexpr int V = Vec<T>::N;
  const int v = blockIdx.y * THREADS + threadIdx.x;
  const T* xt = x + (size_t)t * n * C;
  T* out = x_in + (size_t)t * C;
  if (vec_ok<T>(C, xt, out)) {
    if (v < C / V) dyn::aggregate_token<NMAX>(xt, hs, out, n, C, v, C / V);
  } else {
    // scalar path: this thread's V columns v * V .. v * V + V - 1
    for (int c = v * V; c < min(C, v * V + V); ++c) {
      float acc = 0.0f;
      for_streams<0>(n, [&](int j) { acc += to_float(xt[(size_t)j * C + c]) * hs[j]; });
      out[c] = from_float<T>(acc);
    }
  }
}
