// Sinkhorn-Knopp backward: dL from dM by differentiating through every iteration.
// The forward is replayed once, storing the matrix before each row step (P_{t-1}) and the row
// and column sums (r_t, c_t); then, for t = iters..1, with a = 1/r (or 1 if r <= eps),
// b = 1/c (or 0 if c <= eps), Q = diag(a) P_{t-1} and G = dL/dP_t:
//   db_j = sum_i G_ij Q_ij;          dQ_ij = G_ij b_j - [c_j > eps] db_j b_j^2
//   da_i = sum_j dQ_ij P_{t-1,ij};   dP_{t-1,ij} = dQ_ij a_i - [r_i > eps] da_i a_i^2
// and finally through P_0 = exp(L - rowmax): dL_ij = G_ij P0_ij - share_ij * sum_k G_ik P0_ik,
// where the rowmax gradient is split equally among tied maxima (as MLX's max does).
// One CTA; everything lives in the float32 workspace output `ws` (n*n*(iters+2) + 2*n*iters):
// global but tiny and L1-resident, so any n and iters work.
// Launch: grid (THREADS, 1, 1), threadgroup (THREADS, 1, 1).
#include "mhc_sinkhorn_common.cuh"

using namespace mhc;

// No __restrict__ on ws: it is rewritten between reads by other threads of the CTA.
extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(const float* __restrict__ L,
                                                                 const float* __restrict__ dM,
                                                                 float* __restrict__ dL, float* ws,
                                                                 int n, int iters, float eps) {
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
      const float b = c[j] > eps ? 1.0f / c[j] : 0.0f;
      float db = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float a = r[i] > eps ? 1.0f / r[i] : 1.0f;
        db += G[i * n + j] * a * Pp[i * n + j];
      }
      const float corr = c[j] > eps ? -db * b * b : 0.0f;
      for (int i = 0; i < n; ++i) G[i * n + j] = G[i * n + j] * b + corr;
    }
    __syncthreads();
    // row step: G <- dP_{t-1} (a warp owns a row)
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    for (int i = threadIdx.x >> 5; i < n; i += nwarps) {
      const float a = r[i] > eps ? 1.0f / r[i] : 1.0f;
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
