// Sinkhorn-Knopp backward: dL from dM by differentiating through every iteration.
// The forward is replayed once, storing the matrix before each row step (P_{t-1}) and the row
// and column sums (r_t, c_t); then, for t = iters..1, with a = 1/r (or 1 if r <= eps),
// b = 1/c (or 0 if c <= eps), Q = diag(a) P_{t-1} and G = dL/dP_t:
//   db_j = sum_i G_ij Q_ij;          dQ_ij = G_ij b_j - [c_j > eps] db_j b_j^2
//   da_i = sum_j dQ_ij P_{t-1,ij};   dP_{t-1,ij} = dQ_ij a_i - [r_i > eps] da_i a_i^2
// and finally through P_0 = exp(L - rowmax): dL_ij = G_ij P0_ij - share_ij * sum_k G_ik P0_ik,
// where the rowmax gradient is split equally among tied maxima (as MLX's max does).
// One CTA. n <= LANE_N with 32 threads and use_smem = 1: lane i keeps row i of P and G in
// registers (lane_round's replay: no barrier at all; the history, iters * LANE_N * (LANE_N + 3)
// floats, in shared memory). Why: the tile path below takes ~100 barriers of 1024 threads for
// 20 iterations, on every backward's critical path (H100, n = 4, ncu: tile path 24 us, this one
// 21.5; still latency-bound: one warp, ~1 us per round of forward replay and backward).
// n <= 32 with SMALL_THREADS threads and use_smem = 1: thread (i, j) keeps P and G in
// registers, the history P_{t-1} (iters * TILE floats) and the sums (2 * iters * SMALL_N) in
// shared memory (plus TILE + SMALL_N for column sums). Otherwise everything lives in the float32
// workspace output `ws` (n*n*(iters+2) + 2*n*iters): global, L1-resident, any n and iters.
// Launch: grid = threadgroup = (threads, 1, 1): 32 (n <= LANE_N), SMALL_THREADS (n <= SMALL_N) or THREADS.
#include "mhc_sinkhorn_common.cuh"

using namespace mhc;

constexpr int LANE_N = 8;

// The n <= LANE_N path (header). dL_ij = G_ij P0_ij - share_ij * dot_i as the tile path's.
__device__ __forceinline__ void sinkhorn_bwd_lanes(const float* __restrict__ L, const float* __restrict__ dM,
                                                   float* __restrict__ dL, float* smem, int n, int iters,
                                                   float eps) {
  const int i = threadIdx.x;  // lanes >= n hold zero rows (lanes >= LANE_N: a group of their own)
  const bool row = i < n;
  float* hist = smem;                                       // hist[(t * LANE_N + i) * (LANE_N + 1) + j] = P_{t-1}[i, j]
  float* rs = hist + (size_t)iters * LANE_N * (LANE_N + 1);  // rs[t * LANE_N + i]
  float* cs = rs + (size_t)iters * LANE_N;                   // cs[t * LANE_N + j]
  // logits and P0 are read / recomputed again at the end rather than held (64 registers: the
  // kernel's bound for its 1024-thread paths)
  float p[LANE_N], m = -INFINITY;
#pragma unroll
  for (int j = 0; j < LANE_N; ++j) m = fmaxf(m, row && j < n ? L[i * n + j] : -INFINITY);
#pragma unroll
  for (int j = 0; j < LANE_N; ++j) p[j] = row && j < n ? expf(L[i * n + j] - m) : 0.0f;
  for (int t = 0; t < iters; ++t) {
    float* h = hist + ((size_t)t * LANE_N + i) * (LANE_N + 1);
    float c[LANE_N];
    if (row) {
#pragma unroll
      for (int j = 0; j < LANE_N; ++j) h[j] = p[j];
    }
    const float r = lane_round<LANE_N>(p, c, eps);
    if (row) rs[t * LANE_N + i] = r;
    if (i == 0) {
#pragma unroll
      for (int j = 0; j < LANE_N; ++j) cs[t * LANE_N + j] = c[j];
    }
  }
  __syncwarp();  // lane 0's column sums, read by every lane below
  float g[LANE_N];
#pragma unroll
  for (int j = 0; j < LANE_N; ++j) g[j] = row && j < n ? dM[i * n + j] : 0.0f;
  for (int t = iters - 1; t >= 0; --t) {
    const float* h = hist + ((size_t)t * LANE_N + i) * (LANE_N + 1);
    const float r = row ? rs[t * LANE_N + i] : 1.0f;
    const float a = sk_recip(r, eps, 1.0f);
    float pp[LANE_N], b[LANE_N], db[LANE_N], da = 0.0f;
#pragma unroll
    for (int j = 0; j < LANE_N; ++j) {  // every butterfly in one run (lane_round's header says why)
      pp[j] = row ? h[j] : 0.0f;
      db[j] = lane_column_sum<LANE_N>(g[j] * a * pp[j]);
    }
    float c[LANE_N];
#pragma unroll
    for (int j = 0; j < LANE_N; ++j) c[j] = cs[t * LANE_N + j];
    const float inv = lane_recip<LANE_N>(c, eps, 0.0f);
#pragma unroll
    for (int j = 0; j < LANE_N; ++j) b[j] = __shfl_sync(0xffffffffu, inv, j, LANE_N);
#pragma unroll
    for (int j = 0; j < LANE_N; ++j) {
      g[j] = row && j < n ? g[j] * b[j] + (c[j] > eps ? -db[j] * b[j] * b[j] : 0.0f) : 0.0f;
      da += g[j] * pp[j];
    }
#pragma unroll
    for (int j = 0; j < LANE_N; ++j) g[j] = row && j < n ? g[j] * a + (r > eps ? -da * a * a : 0.0f) : 0.0f;
  }
  float dot = 0.0f, ties = 0.0f, l[LANE_N], p0[LANE_N];
#pragma unroll
  for (int j = 0; j < LANE_N; ++j) {
    l[j] = row && j < n ? L[i * n + j] : -INFINITY;
    p0[j] = row && j < n ? expf(l[j] - m) : 0.0f;
    dot += g[j] * p0[j];
    ties += row && j < n && l[j] == m ? 1.0f : 0.0f;
  }
  if (row) {
#pragma unroll
    for (int j = 0; j < LANE_N; ++j)
      if (j < n) dL[i * n + j] = g[j] * p0[j] - (l[j] == m ? dot / ties : 0.0f);
  }
}

extern "C" __global__ void __launch_bounds__(SMALL_THREADS) MHC_NAME(const float* __restrict__ L,
                                                                 const float* __restrict__ dM,
                                                                 float* __restrict__ dL, float* ws,
                                                                 int n, int iters, float eps, int use_smem) {
  extern __shared__ float smem[];
  if (n <= LANE_N && blockDim.x == 32 && use_smem) {
    sinkhorn_bwd_lanes(L, dM, dL, smem, n, iters, eps);
    return;
  }
  if (n <= SMALL_N && blockDim.x == SMALL_THREADS && use_smem) {
    const int i = threadIdx.x >> 5, j = threadIdx.x & 31;
    const bool ok = i < n && j < n;
    float* T = smem;
    float* col = T + TILE;
    float* hist = col + SMALL_N;                  // hist[t * TILE + i * 33 + j] = P_{t-1}[i, j]
    float* rs = hist + (size_t)iters * TILE;      // rs[t * 32 + i]
    float* cs = rs + (size_t)iters * SMALL_N;     // cs[t * 32 + j]
    const float l = ok ? L[i * n + j] : -INFINITY;
    const float m = warp_max(l);
    const float p0 = ok ? expf(l - m) : 0.0f;
    float p = p0;
    for (int t = 0; t < iters; ++t) {
      hist[t * TILE + i * (SMALL_N + 1) + j] = p;
      const float r = warp_sum(p);
      if (j == 0) rs[t * SMALL_N + i] = r;
      p *= sk_recip(r, eps, 1.0f);
      const float c = column_sum(p, T, col);
      if (i == 0) cs[t * SMALL_N + j] = c;
      p = ok ? p * sk_recip(c, eps, 0.0f) : 0.0f;
    }
    float g = ok ? dM[i * n + j] : 0.0f;
    for (int t = iters - 1; t >= 0; --t) {
      __syncthreads();  // rs / cs of step t were written by other threads
      const float pp = hist[t * TILE + i * (SMALL_N + 1) + j];
      const float r = ok ? rs[t * SMALL_N + i] : 1.0f, c = ok ? cs[t * SMALL_N + j] : 1.0f;
      const float a = sk_recip(r, eps, 1.0f), b = sk_recip(c, eps, 0.0f);
      const float db = column_sum(g * a * pp, T, col);
      g = ok ? g * b + (c > eps ? -db * b * b : 0.0f) : 0.0f;
      const float da = warp_sum(g * pp);
      g = ok ? g * a + (r > eps ? -da * a * a : 0.0f) : 0.0f;
    }
    const float dot = warp_sum(g * p0);
    const float ties = warp_sum(ok && l == m ? 1.0f : 0.0f);
    if (ok) dL[i * n + j] = g * p0 - (l == m ? dot / ties : 0.0f);
    return;
  }
  const int nn = n * n;
  float* hist = ws;                       // hist[t * nn]: P before row step t (t = 0..iters-1); hist[iters*nn]: P0 copy
  float* G = ws + (size_t)(iters + 1) * nn;  // running gradient
  float* rs = G + nn;                     // rs[t * n + i]: row sums of step t
  float* cs = rs + (size_t)iters * n;     // cs[t * n + j]: column sums of step t
  float* P0 = hist + (size_t)iters * nn;
  float* P = G;  // replay in G's space, which is free until the backward starts

  exp_shifted_rows(L, P, n);
  __syncthreads();
  for (int k = threadIdx.x; k < nn; k += blockDim.x) P0[k] = P[k];
  for (int t = 0; t < iters; ++t) {
    for (int k = threadIdx.x; k < nn; k += blockDim.x) hist[(size_t)t * nn + k] = P[k];
    __syncthreads();
    normalize_rows(P, n, eps, rs + t * n);
    __syncthreads();
    normalize_cols(P, n, eps, cs + t * n);
    __syncthreads();
  }
  for (int k = threadIdx.x; k < nn; k += blockDim.x) G[k] = dM[k];
  __syncthreads();

  for (int t = iters - 1; t >= 0; --t) {
    const float* Pp = hist + (size_t)t * nn;
    const float* r = rs + t * n;
    const float* c = cs + t * n;
    // column step: G <- dQ (a thread owns a column)
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const float b = sk_recip(c[j], eps, 0.0f);
      float db = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float a = sk_recip(r[i], eps, 1.0f);
        db += G[i * n + j] * a * Pp[i * n + j];
      }
      const float corr = c[j] > eps ? -db * b * b : 0.0f;
      for (int i = 0; i < n; ++i) G[i * n + j] = G[i * n + j] * b + corr;
    }
    __syncthreads();
    // row step: G <- dP_{t-1} (a warp owns a row)
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int i = threadIdx.x >> 5; i < n; i += nwarps) {
      const float a = sk_recip(r[i], eps, 1.0f);
      float da = 0.0f;
      for (int j = lane; j < n; j += 32) da += G[i * n + j] * Pp[i * n + j];
      da = warp_sum(da);
      const float corr = r[i] > eps ? -da * a * a : 0.0f;
      for (int j = lane; j < n; j += 32) G[i * n + j] = G[i * n + j] * a + corr;
    }
    __syncthreads();
  }
  // through P0 = exp(L - rowmax(L))
  const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int i = threadIdx.x >> 5; i < n; i += nwarps) {
    float m = -INFINITY, dot = 0.0f;
    for (int j = lane; j < n; j += 32) {
      m = fmaxf(m, L[i * n + j]);
      dot += G[i * n + j] * P0[i * n + j];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    dot = warp_sum(dot);
    float ties = 0.0f;
    for (int j = lane; j < n; j += 32) ties += L[i * n + j] == m ? 1.0f : 0.0f;
    ties = warp_sum(ties);
    for (int j = lane; j < n; j += 32) {
      const float share = L[i * n + j] == m ? dot / ties : 0.0f;
      dL[i * n + j] = G[i * n + j] * P0[i * n + j] - share;
    }
  }
}
