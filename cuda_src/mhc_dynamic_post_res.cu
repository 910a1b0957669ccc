// x_out[t, o, c] = sum_i h_res[t, o, i] x[t, i, c] + h_post[t, o] f[t, c] in float32, stored in
// MHC_DTYPE: LigerMHCPostResFunction (src/liger_kernel/ops/mhc.py:1096-1110, same order: the
// h_post f term first, then streams i = 0, 1, ...). x and f are read once, x_out written once.
// Inputs: x [T, n, C], f [T, C] (MHC_DTYPE), h_post [T, n], h_res [T, n, n] (float32).
// Output: x_out [T, n, C]. Grid (threads): (T * THREADS, ceil(ceil(C / VEC) / THREADS), 1); each
// thread one 16-byte column vector of every stream of one token. Compile-time NMAX >= n keeps
// the token's n vectors in registers (and the coefficients: no shared memory, no barrier); NMAX = 0
// re-reads them per output stream (L1 hits). Shared memory: n n + n floats (NMAX = 0, scalar path).
#include "mhc_dynamic_common.cuh"

using namespace mhc;

// Tokens last to first (MHC_PR_REVERSE, 0 for an A/B): the forward's coefficients + x_in (or pre) read x
// and wrote x_in last for the last tokens, which may still be in L2 when this launch starts, and the
// tokens this launch reads and writes last are those the next forward (or layer) reads first. Session 43,
// H100, same-run A/Bs of the DynamicMHC forward, identity F, medians: 396.6 / 398.1 vs 400.8 / 400.3 us at
// (8192, 4, 4096), 126.2 / 129.7 vs 132.6 / 138.2 at (4096, 4, 2048).
#ifndef MHC_PR_REVERSE
#define MHC_PR_REVERSE 1
#endif

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const T* __restrict__ f, const float* __restrict__ h_post,
    const float* __restrict__ h_res, T* __restrict__ out, int n, int C) {
  extern __shared__ float smem[];
  float* hr = smem;        // n n
  float* hpo = hr + n * n; // n
  const int t = MHC_PR_REVERSE ? gridDim.x - 1 - blockIdx.x : blockIdx.x, tid = threadIdx.x;
  constexpr int V = Vec<T>::N;
  const int v = blockIdx.y * THREADS + tid;
  const T* xt = x + (size_t)t * n * C;
  const T* ft = f + (size_t)t * C;
  T* ot = out + (size_t)t * n * C;
  if constexpr (NMAX > 0) {
    constexpr int NR = NMAX > 0 ? NMAX : 1;  // (array sizes of the discarded NMAX = 0 branch)
    // The 16-byte path (taken by the whole CTA or none of it): f's and x's vectors are loaded before
    // the coefficients, which every thread reads itself (L1 broadcasts), so the token's DRAM reads are
    // in flight at once instead of behind a coefficient load and a barrier (H200, T = 8192, n = 4,
    // C = 4096: the layer's forward 408.0 vs 427.7 us).
    if (vec_ok<T>(C, xt, ft, ot)) {
      if (v >= C / V) return;
      uint4 xr[NR];
      const uint4 fr = ldg_vec(ft + v * V);
#pragma unroll
      for (int i = 0; i < NMAX; ++i)
        if (i < n) xr[i] = ldg_vec(xt + (size_t)i * C + v * V);
      float w[NR][NR], hp[NR];
#pragma unroll
      for (int o = 0; o < NMAX; ++o) {
        hp[o] = o < n ? __ldg(h_post + (size_t)t * n + o) : 0.0f;
#pragma unroll
        for (int i = 0; i < NMAX; ++i) w[o][i] = o < n && i < n ? __ldg(h_res + ((size_t)t * n + o) * n + i) : 0.0f;
      }
      float fv[V], xv[NR][V];
      widen_vec<T>(fr, fv);
#pragma unroll
      for (int i = 0; i < NMAX; ++i) widen_vec<T>(xr[i], xv[i]);
#pragma unroll
      for (int o = 0; o < NMAX; ++o) {
        if (o < n) {
          float acc[V];
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = fv[e] * hp[o];
#pragma unroll
          for (int i = 0; i < NMAX; ++i) {
            if (i < n) {
#pragma unroll
              for (int e = 0; e < V; ++e) acc[e] += xv[i][e] * w[o][i];
            }
          }
          store_vec(ot + (size_t)o * C + v * V, acc);
        }
      }
      return;
    }
  }
  for (int e = tid; e < n * n; e += THREADS) hr[e] = h_res[(size_t)t * n * n + e];
  for (int e = tid; e < n; e += THREADS) hpo[e] = h_post[(size_t)t * n + e];
  __syncthreads();
  if (vec_ok<T>(C, xt, ft, ot)) {  // NMAX = 0: x's vectors re-read per output stream (L1 hits)
    if (v >= C / V) return;
    float fv[V];
    load_vec(ft + v * V, fv);
    for (int o = 0; o < n; ++o) {
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = fv[e] * hpo[o];
      for (int i = 0; i < n; ++i) {
        float xv[V];
        load_vec(xt + (size_t)i * C + v * V, xv);
        const float w = hr[o * n + i];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += xv[e] * w;
      }
      store_vec(ot + (size_t)o * C + v * V, acc);
    }
  } else {
    for (int c = v * V; c < min(C, v * V + V); ++c) {
      const float fc = to_float(ft[c]);
      for (int o = 0; o < n; ++o) {
        float acc = fc * hpo[o];
        for (int i = 0; i < n; ++i) acc += to_float(xt[(size_t)i * C + c]) * hr[o * n + i];
        ot[(size_t)o * C + c] = from_float<T>(acc);
      }
    }
  }
}
