// Backward of mhc_dynamic_post_res (_mhc_post_res_bwd_kernel, src/liger_kernel/ops/mhc.py:1122):
//   dx[i, c]    = sum_o h_res[o, i] dout[o, c]      df[c] = sum_o h_post[o] dout[o, c]
//   dh_post[o]  = sum_c dout[o, c] f[c]            dh_res[o, i] = sum_c dout[o, c] x[i, c]
// per token; no reduction over tokens (the coefficients are per token). One CTA per token.
// NMAX >= n: one pass over the token, n + n n dot products accumulated in registers and reduced
// once. NMAX = 0: the pass writes dx and df; then one block reduction per output stream o over
// chunks of 8 input streams (x re-read from cache).
// Inputs: x [T, n, C], f [T, C], h_post [T, n], h_res [T, n, n], dout [T, n, C].
// Outputs: dx [T, n, C], df [T, C] (MHC_DTYPE), dh_post [T, n], dh_res [T, n, n] (float32).
// Grid (threads): (T * THREADS, 1, 1). Shared memory: n n + n + WARPS * R + R floats with
// R = NMAX + NMAX * NMAX (NMAX > 0) or 9.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

namespace {
constexpr int CHUNK = 8;  // generic path: input streams per reduction
constexpr int R = NMAX > 0 ? NMAX + NMAX * NMAX : CHUNK + 1;
}

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const T* __restrict__ f, const float* __restrict__ h_post,
    const float* __restrict__ h_res, const T* __restrict__ dout,
    T* __restrict__ dx, T* __restrict__ df, float* __restrict__ dh_post, float* __restrict__ dh_res,
    int n, int C) {
  extern __shared__ float smem[];
  float* hr = smem;               // n n
  float* hpo = hr + n * n;        // n
  float* scratch = hpo + n;       // WARPS * R
  float* sums = scratch + dyn::WARPS * R;  // R
  const int t = blockIdx.x, tid = threadIdx.x;
  for (int e = tid; e < n * n; e += THREADS) hr[e] = h_res[(size_t)t * n * n + e];
  for (int e = tid; e < n; e += THREADS) hpo[e] = h_post[(size_t)t * n + e];
  __syncthreads();
  constexpr int V = Vec<T>::N;
  const T* xt = x + (size_t)t * n * C;
  const T* ft = f + (size_t)t * C;
  const T* gt = dout + (size_t)t * n * C;
  T* dxt = dx + (size_t)t * n * C;
  T* dft = df + (size_t)t * C;
  const bool vec = vec_ok<T>(C, xt, ft, gt) && vec_ok<T>(C, dxt, dft);
  const int units = vec ? C / V : C;  // a unit: one 16-byte vector, or one column
  const int W = vec ? V : 1;

  // load `W` elements of row p at unit u
  auto load = [&](const T* p, int u, float* v) {
    if (vec) {
      float tmp[V];
      load_vec(p + (size_t)u * V, tmp);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = tmp[e];
    } else {
      v[0] = to_float(p[u]);
    }
  };
  auto store = [&](T* p, int u, const float* v) {
    if (vec) {
      float tmp[V];
#pragma unroll
      for (int e = 0; e < V; ++e) tmp[e] = v[e];
      store_vec(p + (size_t)u * V, tmp);
    } else {
      p[u] = from_float<T>(v[0]);
    }
  };

  if constexpr (NMAX > 0) {
    float acc[R];
#pragma unroll
    for (int q = 0; q < R; ++q) acc[q] = 0.0f;
    for (int u = tid; u < units; u += THREADS) {
      constexpr int NA = NMAX > 0 ? NMAX : 1;
      float fv[V], g[NA][V], xv[NA][V];
      load(ft, u, fv);
#pragma unroll
      for (int o = 0; o < NMAX; ++o)
        if (o < n) load(gt + (size_t)o * C, u, g[o]);
#pragma unroll
      for (int i = 0; i < NMAX; ++i)
        if (i < n) load(xt + (size_t)i * C, u, xv[i]);
      float dfv[V];
      for (int e = 0; e < W; ++e) dfv[e] = 0.0f;
#pragma unroll
      for (int o = 0; o < NMAX; ++o) {
        if (o < n) {
          for (int e = 0; e < W; ++e) {
            dfv[e] += g[o][e] * hpo[o];
            acc[o] += g[o][e] * fv[e];
          }
#pragma unroll
          for (int i = 0; i < NMAX; ++i)
            if (i < n)
              for (int e = 0; e < W; ++e) acc[NMAX + o * NMAX + i] += g[o][e] * xv[i][e];
        }
      }
      store(dft, u, dfv);
#pragma unroll
      for (int i = 0; i < NMAX; ++i) {
        if (i < n) {
          float d[V];
          for (int e = 0; e < W; ++e) d[e] = 0.0f;
#pragma unroll
          for (int o = 0; o < NMAX; ++o)
            if (o < n)
              for (int e = 0; e < W; ++e) d[e] += g[o][e] * hr[o * n + i];
          store(dxt + (size_t)i * C, u, d);
        }
      }
    }
    dyn::block_sum_n<R>(acc, scratch, sums);
    for (int o = tid; o < n; o += THREADS) dh_post[(size_t)t * n + o] = sums[o];
    for (int e = tid; e < n * n; e += THREADS) dh_res[(size_t)t * n * n + e] = sums[NMAX + (e / n) * NMAX + e % n];
  } else {
    for (int u = tid; u < units; u += THREADS) {
      float dfv[V];
      for (int e = 0; e < W; ++e) dfv[e] = 0.0f;
      for (int o = 0; o < n; ++o) {
        float g[V];
        load(gt + (size_t)o * C, u, g);
        for (int e = 0; e < W; ++e) dfv[e] += g[e] * hpo[o];
      }
      store(dft, u, dfv);
      for (int i = 0; i < n; ++i) {
        float d[V];
        for (int e = 0; e < W; ++e) d[e] = 0.0f;
        for (int o = 0; o < n; ++o) {
          float g[V];
          load(gt + (size_t)o * C, u, g);
          for (int e = 0; e < W; ++e) d[e] += g[e] * hr[o * n + i];
        }
        store(dxt + (size_t)i * C, u, d);
      }
    }
    for (int o = 0; o < n; ++o) {
      for (int i0 = 0; i0 < n; i0 += CHUNK) {
        float acc[R];
#pragma unroll
        for (int q = 0; q < R; ++q) acc[q] = 0.0f;
        for (int u = tid; u < units; u += THREADS) {
          float g[V];
          load(gt + (size_t)o * C, u, g);
          if (i0 == 0) {
            float fv[V];
            load(ft, u, fv);
            for (int e = 0; e < W; ++e) acc[CHUNK] += g[e] * fv[e];
          }
#pragma unroll
          for (int q = 0; q < CHUNK; ++q) {
            if (i0 + q < n) {
              float xv[V];
              load(xt + (size_t)(i0 + q) * C, u, xv);
              for (int e = 0; e < W; ++e) acc[q] += g[e] * xv[e];
            }
          }
        }
        dyn::block_sum_n<R>(acc, scratch, sums);
        if (tid < CHUNK && i0 + tid < n) dh_res[(size_t)t * n * n + o * n + i0 + tid] = sums[tid];
        if (tid == 0 && i0 == 0) dh_post[(size_t)t * n + o] = sums[CHUNK];
        __syncthreads();
      }
    }
  }
}
