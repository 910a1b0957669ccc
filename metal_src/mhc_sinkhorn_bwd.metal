// Sinkhorn-Knopp backward: dL from dM by differentiating through every iteration.
// The forward is replayed once, storing the matrix before each row step (P_{t-1}) and the row
// and column sums (r_t, c_t); then, for t = iters..1, with a = 1/r (or 1 if r <= eps),
// b = 1/c (or 0 if c <= eps), Q = diag(a) P_{t-1} and G = dL/dP_t:
//   db_j = sum_i G_ij Q_ij;          dQ_ij = G_ij b_j - [c_j > eps] db_j b_j^2
//   da_i = sum_j dQ_ij P_{t-1,ij};   dP_{t-1,ij} = dQ_ij a_i - [r_i > eps] da_i a_i^2
// and finally through P_0 = exp(L - rowmax): dL_ij = G_ij P0_ij - share_ij * sum_k G_ik P0_ik,
// where the rowmax gradient is split equally among tied maxima (as MLX's max does).
// One threadgroup. n <= 32 with SMALL_THREADS threads and use_smem = 1: thread (i, j) keeps P and
// G in registers, the history P_{t-1} (iters * TILE floats) and the sums (2 * iters * SMALL_N)
// in the workspace `ws` (the CUDA kernel keeps them in shared memory; Metal's 32 KB of static
// threadgroup memory cannot hold iters of them), TILE + SMALL_N threadgroup floats for column
// sums. Otherwise everything lives in `ws` (n*n*(iters+2) + 2*n*iters): device memory, tiny and
// cache-resident, so any n and iters work. Mirrors cuda_src/mhc_sinkhorn_bwd.cu.
// Launch: grid = threadgroup = (SMALL_THREADS or THREADS, 1, 1).
#include "mhc_sinkhorn_common.h"

using namespace mhc;

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int iters;
  float eps;
  int use_smem;
};

kernel void MHC_ENTRY(device const float* L [[buffer(0)]], device const float* dM [[buffer(1)]],
                      constant Scalars& s [[buffer(2)]], device float* dL [[buffer(3)]],
                      device float* ws [[buffer(4)]], uint tid [[thread_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint3 tpg [[threads_per_threadgroup]]) {
  threadgroup float T[TILE];
  threadgroup float col[SMALL_N];
  const Tid t{tid, lane, sg};
  const int n = s.n, iters = s.iters, nn = n * n;
  const float eps = s.eps;
  if (n <= SMALL_N && tpg.x == uint(SMALL_THREADS) && s.use_smem) {
    const int i = int(sg), j = int(lane);
    const bool ok = i < n && j < n;
    device float* hist = ws;                      // hist[t * TILE + i * 33 + j] = P_{t-1}[i, j]
    device float* rs = hist + size_t(iters) * TILE;  // rs[t * 32 + i]
    device float* cs = rs + size_t(iters) * SMALL_N;  // cs[t * 32 + j]
    const float l = ok ? L[i * n + j] : -INFINITY;
    const float m = simd_max(l);
    const float p0 = ok ? precise::exp(l - m) : 0.0f;
    float p = p0;
    for (int it = 0; it < iters; ++it) {
      hist[it * TILE + i * (SMALL_N + 1) + j] = p;
      const float r = simd_sum(p);
      if (j == 0) rs[it * SMALL_N + i] = r;
      p *= r > eps ? 1.0f / r : 1.0f;
      const float c = column_sum(p, T, col, t);
      if (i == 0) cs[it * SMALL_N + j] = c;
      p = ok ? p * (c > eps ? 1.0f / c : 0.0f) : 0.0f;
    }
    float g = ok ? dM[i * n + j] : 0.0f;
    for (int it = iters - 1; it >= 0; --it) {
      threadgroup_barrier(mem_flags::mem_device);  // rs / cs of step it were written by other threads
      const float pp = hist[it * TILE + i * (SMALL_N + 1) + j];
      const float r = ok ? rs[it * SMALL_N + i] : 1.0f, c = ok ? cs[it * SMALL_N + j] : 1.0f;
      const float a = r > eps ? 1.0f / r : 1.0f, b = c > eps ? 1.0f / c : 0.0f;
      const float db = column_sum(g * a * pp, T, col, t);
      g = ok ? g * b + (c > eps ? -db * b * b : 0.0f) : 0.0f;
      const float da = simd_sum(g * pp);
      g = ok ? g * a + (r > eps ? -da * a * a : 0.0f) : 0.0f;
    }
    const float dot = simd_sum(g * p0);
    const float ties = simd_sum(ok && l == m ? 1.0f : 0.0f);
    if (ok) dL[i * n + j] = g * p0 - (l == m ? dot / ties : 0.0f);
    return;
  }
  device float* hist = ws;                                // hist[t * nn]: P before row step t; hist[iters*nn]: P0
  device float* G = ws + size_t(iters + 1) * nn;          // running gradient
  device float* rs = G + nn;                              // rs[t * n + i]: row sums of step t
  device float* cs = rs + size_t(iters) * n;              // cs[t * n + j]: column sums of step t
  device float* P0 = hist + size_t(iters) * nn;
  device float* P = G;  // replay in G's space, which is free until the backward starts

  exp_shifted_rows(L, P, n, t);
  sync_all();
  for (int k = int(tid); k < nn; k += THREADS) P0[k] = P[k];
  for (int it = 0; it < iters; ++it) {
    for (int k = int(tid); k < nn; k += THREADS) hist[size_t(it) * nn + k] = P[k];
    sync_all();
    normalize_rows(P, n, eps, rs + it * n, t);
    sync_all();
    normalize_cols(P, n, eps, cs + it * n, t);
    sync_all();
  }
  for (int k = int(tid); k < nn; k += THREADS) G[k] = dM[k];
  sync_all();

  for (int it = iters - 1; it >= 0; --it) {
    device const float* Pp = hist + size_t(it) * nn;
    device const float* r = rs + it * n;
    device const float* c = cs + it * n;
    // column step: G <- dQ (a thread owns a column)
    for (int j = int(tid); j < n; j += THREADS) {
      const float b = c[j] > eps ? 1.0f / c[j] : 0.0f;
      float db = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float a = r[i] > eps ? 1.0f / r[i] : 1.0f;
        db += G[i * n + j] * a * Pp[i * n + j];
      }
      const float corr = c[j] > eps ? -db * b * b : 0.0f;
      for (int i = 0; i < n; ++i) G[i * n + j] = G[i * n + j] * b + corr;
    }
    sync_all();
    // row step: G <- dP_{t-1} (a simdgroup owns a row)
    for (int i = int(sg); i < n; i += NSIMD) {
      const float a = r[i] > eps ? 1.0f / r[i] : 1.0f;
      float da = 0.0f;
      for (int j = int(lane); j < n; j += SIMD) da += G[i * n + j] * Pp[i * n + j];
      da = simd_sum(da);
      const float corr = r[i] > eps ? -da * a * a : 0.0f;
      for (int j = int(lane); j < n; j += SIMD) G[i * n + j] = G[i * n + j] * a + corr;
    }
    sync_all();
  }
  // through P0 = exp(L - rowmax(L))
  for (int i = int(sg); i < n; i += NSIMD) {
    float m = -INFINITY, dot = 0.0f;
    for (int j = int(lane); j < n; j += SIMD) {
      m = fmax(m, L[i * n + j]);
      dot += G[i * n + j] * P0[i * n + j];
    }
    m = simd_max(m);
    dot = simd_sum(dot);
    float ties = 0.0f;
    for (int j = int(lane); j < n; j += SIMD) ties += L[i * n + j] == m ? 1.0f : 0.0f;
    ties = simd_sum(ties);
    for (int j = int(lane); j < n; j += SIMD) {
      const float share = L[i * n + j] == m ? dot / ties : 0.0f;
      dL[i * n + j] = G[i * n + j] * P0[i * n + j] - share;
    }
  }
}
