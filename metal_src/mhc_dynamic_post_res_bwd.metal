// Backward of mhc_dynamic_post_res (_mhc_post_res_bwd_kernel, src/liger_kernel/ops/mhc.py:1122):
//   dx[i, c]    = sum_o h_res[o, i] dout[o, c]      df[c] = sum_o h_post[o] dout[o, c]
//   dh_post[o]  = sum_c dout[o, c] f[c]            dh_res[o, i] = sum_c dout[o, c] x[i, c]
// per token; no reduction over tokens (the coefficients are per token). Mirrors
// cuda_src/mhc_dynamic_post_res_bwd.cu. NMAX >= n: one pass over the token, n + n n dot products
// accumulated in registers and reduced once. NMAX = 0: the pass writes dx and df; then one block
// reduction per output stream o over chunks of CHUNK input streams (x re-read from cache).
// Inputs: x [T, n, C], f [T, C], h_post [T, n], h_res [T, n, n], dout [T, n, C].
// Outputs: dx [T, n, C], df [T, C] (MHC_DTYPE), dh_post [T, n], dh_res [T, n, n] (float32).
// Launch: grid (T * THREADS, 1, 1), threadgroup (THREADS, 1, 1): one threadgroup per token. A work
// unit is VEC consecutive columns (C % VEC == 0) or one column; W is its width.
#include "mhc_dynamic_common.h"

using namespace mhc;

constant constexpr int CHUNK = 8;  // generic path: input streams per reduction
constant constexpr int NA = NMAX > 0 ? NMAX : 1;
constant constexpr int R = NMAX > 0 ? NMAX + NMAX * NMAX : CHUNK + 1;

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
};

// The coefficients and rows of one token.
struct Token {
  device const T* x;
  device const T* f;
  device const T* g;  // dout
  device T* dx;
  device T* df;
  device const float* hr;   // h_res [n, n]
  device const float* hpo;  // h_post [n]
  int n;
  int C;
};

// NMAX >= n: dx, df for this thread's units, and the n + n n dot products in acc (dh_post[o] at o,
// dh_res[o, i] at NA + o NA + i).
template <int W>
inline void pass_registers(Token k, int units, uint tid, thread float (&acc)[R]) {
  for (int u = int(tid); u < units; u += THREADS) {
    const int c = u * W;
    float fv[W], g[NA][W], xv[NA][W];
    load_w<T, W>(k.f + c, fv);
    for (int o = 0; o < NA; ++o)
      if (o < k.n) load_w<T, W>(k.g + size_t(o) * k.C + c, g[o]);
    for (int i = 0; i < NA; ++i)
      if (i < k.n) load_w<T, W>(k.x + size_t(i) * k.C + c, xv[i]);
    float dfv[W];
    for (int e = 0; e < W; ++e) dfv[e] = 0.0f;
    for (int o = 0; o < NA; ++o) {
      if (o < k.n) {
        const float hp = k.hpo[o];
        for (int e = 0; e < W; ++e) {
          dfv[e] += g[o][e] * hp;
          acc[o] += g[o][e] * fv[e];
        }
        for (int i = 0; i < NA; ++i)
          if (i < k.n)
            for (int e = 0; e < W; ++e) acc[NA + o * NA + i] += g[o][e] * xv[i][e];
      }
    }
    store_w<T, W>(k.df + c, dfv);
    for (int i = 0; i < NA; ++i) {
      if (i < k.n) {
        float d[W];
        for (int e = 0; e < W; ++e) d[e] = 0.0f;
        for (int o = 0; o < NA; ++o) {
          if (o < k.n) {
            const float w = k.hr[o * k.n + i];
            for (int e = 0; e < W; ++e) d[e] += g[o][e] * w;
          }
        }
        store_w<T, W>(k.dx + size_t(i) * k.C + c, d);
      }
    }
  }
}

// Generic n: dx and df for this thread's units (dout re-read per input stream, from cache).
template <int W>
inline void pass_generic(Token k, int units, uint tid) {
  for (int u = int(tid); u < units; u += THREADS) {
    const int c = u * W;
    float dfv[W];
    for (int e = 0; e < W; ++e) dfv[e] = 0.0f;
    for (int o = 0; o < k.n; ++o) {
      float g[W];
      load_w<T, W>(k.g + size_t(o) * k.C + c, g);
      const float hp = k.hpo[o];
      for (int e = 0; e < W; ++e) dfv[e] += g[e] * hp;
    }
    store_w<T, W>(k.df + c, dfv);
    for (int i = 0; i < k.n; ++i) {
      float d[W];
      for (int e = 0; e < W; ++e) d[e] = 0.0f;
      for (int o = 0; o < k.n; ++o) {
        float g[W];
        load_w<T, W>(k.g + size_t(o) * k.C + c, g);
        const float w = k.hr[o * k.n + i];
        for (int e = 0; e < W; ++e) d[e] += g[e] * w;
      }
      store_w<T, W>(k.dx + size_t(i) * k.C + c, d);
    }
  }
}

// Generic n: acc[q] = sum over this thread's units of dout[o] . x[i0 + q] (q < CHUNK) and, for
// i0 == 0, acc[CHUNK] = dout[o] . f.
template <int W>
inline void dots_generic(Token k, int units, int o, int i0, uint tid, thread float (&acc)[R]) {
  for (int u = int(tid); u < units; u += THREADS) {
    const int c = u * W;
    float g[W];
    load_w<T, W>(k.g + size_t(o) * k.C + c, g);
    if (i0 == 0) {
      float fv[W];
      load_w<T, W>(k.f + c, fv);
      for (int e = 0; e < W; ++e) acc[CHUNK] += g[e] * fv[e];
    }
    for (int q = 0; q < CHUNK; ++q) {
      if (i0 + q < k.n) {
        float xv[W];
        load_w<T, W>(k.x + size_t(i0 + q) * k.C + c, xv);
        for (int e = 0; e < W; ++e) acc[q] += g[e] * xv[e];
      }
    }
  }
}

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const T* f [[buffer(1)]],
                      device const float* h_post [[buffer(2)]], device const float* h_res [[buffer(3)]],
                      device const T* dout [[buffer(4)]], constant Scalars& s [[buffer(5)]],
                      device T* dx [[buffer(6)]], device T* df [[buffer(7)]], device float* dh_post [[buffer(8)]],
                      device float* dh_res [[buffer(9)]], uint tid [[thread_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint3 tgid [[threadgroup_position_in_grid]]) {
  threadgroup float scratch[NSIMD * R];
  threadgroup float sums[R];
  const Tid tt{tid, lane, sg};
  const int n = s.n, C = s.C, t = int(tgid.x);
  const Token k{x + size_t(t) * n * C, f + size_t(t) * C, dout + size_t(t) * n * C, dx + size_t(t) * n * C,
                df + size_t(t) * C, h_res + size_t(t) * n * n, h_post + size_t(t) * n, n, C};
  const bool vec = vec_ok(C);
  const int units = vec ? C / VEC : C;
  if (NMAX > 0) {
    float acc[R];
    for (int q = 0; q < R; ++q) acc[q] = 0.0f;
    if (vec) {
      pass_registers<VEC>(k, units, tid, acc);
    } else {
      pass_registers<1>(k, units, tid, acc);
    }
    block_sum_n<R>(acc, scratch, sums, tt);
    for (int o = int(tid); o < n; o += THREADS) dh_post[size_t(t) * n + o] = sums[o];
    for (int e = int(tid); e < n * n; e += THREADS) dh_res[size_t(t) * n * n + e] = sums[NA + (e / n) * NA + e % n];
    return;
  }
  if (vec) {
    pass_generic<VEC>(k, units, tid);
  } else {
    pass_generic<1>(k, units, tid);
  }
  for (int o = 0; o < n; ++o) {
    for (int i0 = 0; i0 < n; i0 += CHUNK) {
      float acc[R];
      for (int q = 0; q < R; ++q) acc[q] = 0.0f;
      if (vec) {
        dots_generic<VEC>(k, units, o, i0, tid, acc);
      } else {
        dots_generic<1>(k, units, o, i0, tid, acc);
      }
      block_sum_n<R>(acc, scratch, sums, tt);
      if (int(tid) < CHUNK && i0 + int(tid) < n) dh_res[size_t(t) * n * n + o * n + i0 + int(tid)] = sums[tid];
      if (tid == 0 && i0 == 0) dh_post[size_t(t) * n + o] = sums[CHUNK];
    }
  }
}
