// x_out[t, o, c] = sum_i h_res[t, o, i] x[t, i, c] + h_post[t, o] f[t, c] in float32, stored in
// MHC_DTYPE: LigerMHCPostResFunction (src/liger_kernel/ops/mhc.py:1096-1110, same order: the
// h_post f term first, then streams i = 0, 1, ...). x and f are read once, x_out written once.
// Inputs: x [T, n, C], f [T, C] (MHC_DTYPE), h_post [T, n], h_res [T, n, n] (float32).
// Output: x_out [T, n, C]. Grid (threads): (T * THREADS, ceil(ceil(C / VEC) / THREADS), 1); each
// thread one 16-byte column vector of every stream of one token. Compile-time NMAX >= n keeps
// the token's n vectors in registers; NMAX = 0 re-reads them per output stream (L1 hits).
// Shared memory: n n + n floats.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const T* __restrict__ f, const float* __restrict__ h_post,
    const float* __restrict__ h_res, T* __restrict__ out, int n, int C) {
  extern __shared__ float smem[];
  float* hr = smem;        // n n
  float* hpo = hr + n * n; // n
  const int t = blockIdx.x, tid = threadIdx.x;
  for (int e = tid; e < n * n; e += THREADS) hr[e] = h_res[(size_t)t * n * n + e];
  for (int e = tid; e < n; e += THREADS) hpo[e] = h_post[(size_t)t * n + e];
  __syncthreads();
  constexpr int V = Vec<T>::N;
  const int v = blockIdx.y * THREADS + tid;
  const T* xt = x + (size_t)t * n * C;
  const T* ft = f + (size_t)t * C;
  T* ot = out + (size_t)t * n * C;
  if (vec_ok<T>(C, xt, ft, ot)) {
    if (v >= C / V) return;
    float fv[V];
    load_vec(ft + v * V, fv);
    if constexpr (NMAX > 0) {
      float xv[NMAX > 0 ? NMAX : 1][V];
#pragma unroll
      for (int i = 0; i < NMAX; ++i)
        if (i < n) load_vec(xt + (size_t)i * C + v * V, xv[i]);
#pragma unroll
      for (int o = 0; o < NMAX; ++o) {
        if (o < n) {
          float acc[V];
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = fv[e] * hpo[o];
#pragma unroll
          for (int i = 0; i < NMAX; ++i) {
            if (i < n) {
              const float w = hr[o * n + i];
#pragma unroll
              for (int e = 0; e < V; ++e) acc[e] += xv[i][e] * w;
            }
          }
          store_vec(ot + (size_t)o * C + v * V, acc);
        }
      }
    } else {
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
