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

// W elements of a row at unit u: one 16-byte vector (VEC) or one column. Compile-time W keeps
// every per-element array in registers.
template <int W, bool VEC>
struct Io {
  static __device__ __forceinline__ void load(const T* p, int u, float (&v)[W]) {
    if constexpr (VEC) load_vec(p + (size_t)u * W, v);
    else v[0] = to_float(p[u]);
  }
  static __device__ __forceinline__ void store(T* p, int u, const float (&v)[W]) {
    if constexpr (VEC) store_vec(p + (size_t)u * W, v);
    else p[u] = from_float<T>(v[0]);
  }
};

// NMAX >= n: dx, df for this thread's units, and the n + n n dot products in acc.
template <int W, bool VEC>
__device__ __forceinline__ void pass_registers(const T* xt, const T* ft, const T* gt, T* dxt, T* dft,
                                               const float* hr, const float* hpo, int n, int C, int units,
                                               float (&acc)[R]) {
  using io = Io<W, VEC>;
  constexpr int NA = NMAX > 0 ? NMAX : 1;
  for (int u = threadIdx.x; u < units; u += THREADS) {
    float fv[W], g[NA][W], xv[NA][W];
    io::load(ft, u, fv);
#pragma unroll
    for (int o = 0; o < NA; ++o)
      if (o < n) io::load(gt + (size_t)o * C, u, g[o]);
#pragma unroll
    for (int i = 0; i < NA; ++i)
      if (i < n) io::load(xt + (size_t)i * C, u, xv[i]);
    float dfv[W];
#pragma unroll
    for (int e = 0; e < W; ++e) dfv[e] = 0.0f;
#pragma unroll
    for (int o = 0; o < NA; ++o) {
      if (o < n) {
#pragma unroll
        for (int e = 0; e < W; ++e) {
          dfv[e] += g[o][e] * hpo[o];
          acc[o] += g[o][e] * fv[e];
        }
#pragma unroll
        for (int i = 0; i < NA; ++i)
          if (i < n)
#pragma unroll
            for (int e = 0; e < W; ++e) acc[NA + o * NA + i] += g[o][e] * xv[i][e];
      }
    }
    io::store(dft, u, dfv);
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      if (i < n) {
        float d[W];
#pragma unroll
        for (int e = 0; e < W; ++e) d[e] = 0.0f;
#pragma unroll
        for (int o = 0; o < NA; ++o)
          if (o < n)
#pragma unroll
            for (int e = 0; e < W; ++e) d[e] += g[o][e] * hr[o * n + i];
        io::store(dxt + (size_t)i * C, u, d);
      }
    }
  }
}

// Generic n: dx and df for this thread's units (dout re-read per input stream, from cache).
template <int W, bool VEC>
__device__ __forceinline__ void pass_generic(const T* gt, T* dxt, T* dft, const float* hr, const float* hpo,
                                             int n, int C, int units) {
  using io = Io<W, VEC>;
  for (int u = threadIdx.x; u < units; u += THREADS) {
    float dfv[W];
#pragma unroll
    for (int e = 0; e < W; ++e) dfv[e] = 0.0f;
    for (int o = 0; o < n; ++o) {
      float g[W];
      io::load(gt + (size_t)o * C, u, g);
#pragma unroll
      for (int e = 0; e < W; ++e) dfv[e] += g[e] * hpo[o];
    }
    io::store(dft, u, dfv);
    for (int i = 0; i < n; ++i) {
      float d[W];
#pragma unroll
      for (int e = 0; e < W; ++e) d[e] = 0.0f;
      for (int o = 0; o < n; ++o) {
        float g[W];
        io::load(gt + (size_t)o * C, u, g);
#pragma unroll
        for (int e = 0; e < W; ++e) d[e] += g[e] * hr[o * n + i];
      }
      io::store(dxt + (size_t)i * C, u, d);
    }
  }
}

// Generic n: acc[q] = sum over this thread's units of dout[o] . x[i0 + q] (q < CHUNK) and, for
// i0 == 0, acc[CHUNK] = dout[o] . f.
template <int W, bool VEC>
__device__ __forceinline__ void dots_generic(const T* xt, const T* ft, const T* gt, int n, int C, int units,
                                             int o, int i0, float (&acc)[R]) {
  using io = Io<W, VEC>;
  for (int u = threadIdx.x; u < units; u += THREADS) {
    float g[W];
    io::load(gt + (size_t)o * C, u, g);
    if (i0 == 0) {
      float fv[W];
      io::load(ft, u, fv);
#pragma unroll
      for (int e = 0; e < W; ++e) acc[CHUNK] += g[e] * fv[e];
    }
#pragma unroll
    for (int q = 0; q < CHUNK; ++q) {
      if (i0 + q < n) {
        float xv[W];
        io::load(xt + (size_t)(i0 + q) * C, u, xv);
#pragma unroll
        for (int e = 0; e < W; ++e) acc[q] += g[e] * xv[e];
      }
    }
  }
}
}  // namespace

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
  const int units = vec ? C / V : C;

  if constexpr (NMAX > 0) {
    float acc[R];
#pragma unroll
    for (int q = 0; q < R; ++q) acc[q] = 0.0f;
    if (vec) pass_registers<V, true>(xt, ft, gt, dxt, dft, hr, hpo, n, C, units, acc);
    else pass_registers<1, false>(xt, ft, gt, dxt, dft, hr, hpo, n, C, units, acc);
    dyn::block_sum_n<R>(acc, scratch, sums);
    for (int o = tid; o < n; o += THREADS) dh_post[(size_t)t * n + o] = sums[o];
    for (int e = tid; e < n * n; e += THREADS) dh_res[(size_t)t * n * n + e] = sums[NMAX + (e / n) * NMAX + e % n];
  } else {
    if (vec) pass_generic<V, true>(gt, dxt, dft, hr, hpo, n, C, units);
    else pass_generic<1, false>(gt, dxt, dft, hr, hpo, n, C, units);
    for (int o = 0; o < n; ++o) {
      for (int i0 = 0; i0 < n; i0 += CHUNK) {
        float acc[R];
#pragma unroll
        for (int q = 0; q < R; ++q) acc[q] = 0.0f;
        if (vec) dots_generic<V, true>(xt, ft, gt, n, C, units, o, i0, acc);
        else dots_generic<1, false>(xt, ft, gt, n, C, units, o, i0, acc);
        dyn::block_sum_n<R>(acc, scratch, sums);
        if (tid < CHUNK && i0 + tid < n) dh_res[(size_t)t * n * n + o * n + i0 + tid] = sums[tid];
        if (tid == 0 && i0 == 0) dh_post[(size_t)t * n + o] = sums[CHUNK];
        __syncthreads();
      }
    }
  }
}
