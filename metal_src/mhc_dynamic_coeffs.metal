// Per-token mHC coefficients (LigerMHCCoeffsFunction.forward, src/liger_kernel/ops/mhc.py) and, with
// with_pre, x_in = h_pre . x (LigerMHCPreFunction) in the same threadgroup. Per token:
//   mix[m]  = (sum_s zpart[s, t, m]) * invr,  invr = rsqrt(sum_s sq[s, t] / K + rms_eps)   (:110-111)
//   h_pre   = sigmoid(alpha_pre mix[:n] + b[:n]) + pre_eps                                  (:452-455)
//   h_post  = sigmoid(alpha_post mix[n:2n] + b[n:2n]) * post_mult                          (:453-456)
//   h_res   = Liger's Sinkhorn(alpha_res mix[2n:] + b[2n:]) with tmax steps              (:469-498)
//   x_in[c] = sum_j h_pre[j] x[t, j, c], stored in MHC_DTYPE                              (:878-890)
// Mirrors cuda_src/mhc_dynamic_coeffs.cu in its mode 0 (a CTA per token, `lanes` = 0: the only mode
// the Metal launcher uses; `lanes` and `slice` are read by the CUDA kernel alone), in the same
// operations and order. zpart / sq are the projection's S partials (mhc_aot/metal_dynamic.py passes
// S = 1: MLX's matmul and sum of squares). mix and invr are kept for the backward.
// Inputs: x [T, n, C], zpart [S, T, M], sq [S, T], b [M], alpha_pre, alpha_post, alpha_res (float32
// scalars). Outputs: h_pre [T, n], h_post [T, n], h_res [T, n, n], x_in [T, C] (or [1] if
// !with_pre), mix [T, M], invr [T].
// Launch: grid (T * THREADS, 1, 1), threadgroup (THREADS, 1, 1): one threadgroup per token.
// Threadgroup memory (static): the token's mix, its Sinkhorn matrix and h_pre for n <= NC (NMAX, or
// COEFFS_N_LIMIT for the generic kernel; the dispatch sends larger n to MLX ops).
#include "mhc_dynamic_common.h"

using namespace mhc;

constant constexpr int COEFFS_N_LIMIT = 32;  // generic kernel: streams its threadgroup arrays hold
constant constexpr int NC = NMAX > 0 ? NMAX : COEFFS_N_LIMIT;
constant constexpr int MC = NC * NC + 2 * NC;
static_assert(MC + NC * NC + NC + NSIMD <= TG_FLOATS_MAX, "threadgroup memory over 32 KB");

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
  int Tn;
  int S;
  int tmax;
  float rms_eps;
  float pre_eps;
  float sinkhorn_eps;
  float post_mult;
  int with_pre;
  int lanes;
  int slice;
};

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const float* zpart [[buffer(1)]],
                      device const float* sq [[buffer(2)]], device const float* b [[buffer(3)]],
                      device const float* alpha_pre [[buffer(4)]], device const float* alpha_post [[buffer(5)]],
                      device const float* alpha_res [[buffer(6)]], constant Scalars& s [[buffer(7)]],
                      device float* h_pre [[buffer(8)]], device float* h_post [[buffer(9)]],
                      device float* h_res [[buffer(10)]], device T* x_in [[buffer(11)]], device float* mix [[buffer(12)]],
                      device float* invr_out [[buffer(13)]], uint tid [[thread_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint3 tgid [[threadgroup_position_in_grid]]) {
  threadgroup float mixs[MC];
  threadgroup float P[NC * NC];   // the Sinkhorn matrix, updated in place
  threadgroup float hp[NC];
  threadgroup float scratch[NSIMD];
  const Tid tt{tid, lane, sg};
  const int n = s.n, C = s.C, Tn = s.Tn, S = s.S, M = n * n + 2 * n, t = int(tgid.x);
  const float eps = s.sinkhorn_eps;
  const float a_pre = alpha_pre[0], a_post = alpha_post[0], a_res = alpha_res[0];

  // the projection's S partials of z[m] and of the sum of squares (entry M), split order
  float ss = 0.0f;
  for (int q = int(tid); q <= M; q += THREADS) {
    float v = 0.0f;
    for (int sp = 0; sp < S; ++sp) v += q < M ? zpart[(size_t(sp) * Tn + t) * M + q] : sq[size_t(sp) * Tn + t];
    if (q < M) {
      mixs[q] = v;
    } else {
      ss = v;
    }
  }
  ss = block_sum(ss, scratch, tt);  // one thread holds it, the others add zeros
  const float invr = precise::rsqrt(ss / float(n * C) + s.rms_eps);
  for (int m = int(tid); m < M; m += THREADS) {
    const float v = mixs[m] * invr;
    mixs[m] = v;
    mix[size_t(t) * M + m] = v;
  }
  if (tid == 0) invr_out[t] = invr;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int j = int(tid); j < n; j += THREADS) {
    const float pre = sigmoid(mixs[j] * a_pre + b[j]) + s.pre_eps;
    hp[j] = pre;
    h_pre[size_t(t) * n + j] = pre;
    h_post[size_t(t) * n + j] = sigmoid(mixs[n + j] * a_post + b[n + j]) * s.post_mult;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (s.with_pre) {  // x_in before the Sinkhorn: the token's loads do not wait on it
    device const T* xt = x + size_t(t) * n * C;
    device T* out = x_in + size_t(t) * C;
    for (int c = int(tid); c < C; c += THREADS) {
      float acc = 0.0f;
      for (int j = 0; j < n; ++j) acc += to_float(xt[size_t(j) * C + c]) * hp[j];
      out[c] = from_float<T>(acc);
    }
  }
  // Liger's Sinkhorn (dynamic_reference.sinkhorn): row softmax (max-subtracted) + eps, a column
  // normalisation, then tmax - 1 row and column normalisations; eps added to every divisor.
  for (int i = int(tid); i < n; i += THREADS) {
    float L[NC];
    for (int j = 0; j < n; ++j) L[j] = mixs[2 * n + i * n + j] * a_res + b[2 * n + i * n + j];
    float mx = L[0];
    for (int j = 1; j < n; ++j) mx = max(mx, L[j]);
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      L[j] = precise::exp(L[j] - mx);
      sum += L[j];
    }
    for (int j = 0; j < n; ++j) P[i * n + j] = L[j] / sum + eps;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int j = int(tid); j < n; j += THREADS) {  // first column normalisation
    float cs = 0.0f;
    for (int i = 0; i < n; ++i) cs += P[i * n + j];
    for (int i = 0; i < n; ++i) P[i * n + j] = P[i * n + j] / (cs + eps);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int it = 1; it < s.tmax; ++it) {
    for (int i = int(tid); i < n; i += THREADS) {
      float rs = 0.0f;
      for (int j = 0; j < n; ++j) rs += P[i * n + j];
      for (int j = 0; j < n; ++j) P[i * n + j] = P[i * n + j] / (rs + eps);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = int(tid); j < n; j += THREADS) {
      float cs = 0.0f;
      for (int i = 0; i < n; ++i) cs += P[i * n + j];
      for (int i = 0; i < n; ++i) P[i * n + j] = P[i * n + j] / (cs + eps);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int e = int(tid); e < n * n; e += THREADS) h_res[size_t(t) * n * n + e] = P[e];
}
