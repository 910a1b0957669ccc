// Pieces of the one-CTA Sinkhorn-Knopp kernels (forward and backward). Mirrored by
// metal_src/mhc_sinkhorn_common.h. A warp owns a row (lanes stride its columns); a thread owns a
// column (rows walked in order, consecutive threads on consecutive columns: coalesced).
#pragma once

#include "mhc_common.cuh"

namespace mhc {

// v > eps ? 1 / v : otherwise, with the reciprocal (rcp.rn.f32, what 1.0f / v compiles to: the
// same bits) never taking v <= eps: the zero rows and columns of padding (past n) would send it
// down its slow path for 0 every round. A guard, not a measured speed-up (the lane Sinkhorn
// backward read 38 us before it and 40 after; lane_recip below is what helped). The asm keeps the
// compiler from folding d back to v.
__device__ __forceinline__ float sk_recip(float v, float eps, float otherwise) {
  const float d = v > eps ? v : 1.0f;
  float r;
#ifdef __CUDA_ARCH__
  asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(d));
#else
  r = 1.0f / d;
#endif
  return v > eps ? r : otherwise;
}

// P[i, :] = exp(L[i, :] - max_j L[i, j]).
__device__ __forceinline__ void exp_shifted_rows(const float* L, float* P, int n) {
  const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int i = threadIdx.x >> 5; i < n; i += nwarps) {
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, L[i * n + j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    for (int j = lane; j < n; j += 32) P[i * n + j] = expf(L[i * n + j] - m);
  }
}

// Row step: r_i = sum_j P[i, j]; P[i, :] *= (r_i > eps ? 1 / r_i : 1). Saves r to `sums` if given.
__device__ __forceinline__ void normalize_rows(float* P, int n, float eps, float* sums) {
  const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int i = threadIdx.x >> 5; i < n; i += nwarps) {
    float s = 0.0f;
    for (int j = lane; j < n; j += 32) s += P[i * n + j];
    s = warp_sum(s);
    if (sums && lane == 0) sums[i] = s;
    const float scale = sk_recip(s, eps, 1.0f);
    for (int j = lane; j < n; j += 32) P[i * n + j] *= scale;
  }
}

// Column step: c_j = sum_i P[i, j]; P[:, j] *= (c_j > eps ? 1 / c_j : 0). Saves c to `sums` if given.
__device__ __forceinline__ void normalize_cols(float* P, int n, float eps, float* sums) {
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += P[i * n + j];
    if (sums) sums[j] = s;
    const float scale = sk_recip(s, eps, 0.0f);
    for (int i = 0; i < n; ++i) P[i * n + j] *= scale;
  }
}

// ---------------------------------------------------------------- n <= 32: one warp per row
// With n <= 32 and SMALL_THREADS threads, thread (i = warp, j = lane) keeps P[i, j] in a register:
// row sums are warp shuffles; column sums go through a transposed shared tile T[j * 33 + i]
// (padded: no bank conflicts) and a shuffle by the warp that owns the column. Two barriers per
// iteration instead of a serial pass per column.
constexpr int SMALL_N = 32;
constexpr int SMALL_THREADS = 32 * SMALL_N;
constexpr int TILE = SMALL_N * (SMALL_N + 1);

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Column sums of the register tile: returns sum_i P[i, j] to every thread of column j.
// `T` holds TILE floats, `col` SMALL_N floats.
__device__ __forceinline__ float column_sum(float p, float* T, float* col) {
  const int i = threadIdx.x >> 5, j = threadIdx.x & 31;
  T[j * (SMALL_N + 1) + i] = p;
  __syncthreads();
  const float s = warp_sum(T[i * (SMALL_N + 1) + j]);  // warp i sums column i
  if (j == 0) col[i] = s;
  __syncthreads();
  return col[j];
}

// ---------------------------------------------------------------- n <= R: a lane per row
// Lane i keeps row i of P in R registers: row sums run serially in the lane, column sums are
// butterflies over aligned groups of R lanes (each lane of a group adds the same pairs, so all get
// the same bits). No barrier: mhc_sinkhorn_bwd's replay for n <= LANE_N in one warp.
template <int R>
__device__ __forceinline__ float lane_column_sum(float v) {
#pragma unroll
  for (int o = 1; o < R; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// sk_recip(c[k], eps, otherwise) in lane k of each group of R lanes; lane j's value reaches the
// group by __shfl_sync(mask, r, j, R). Why: each rcp.rn.f32 carries a slow-path branch that ends
// a basic block, so R of them in every lane ran one after another; one per lane and R pipelined
// shuffles give the same bits (H100, the Sinkhorn backward at n = 4: 31 -> 21.5 us).
template <int R>
__device__ __forceinline__ float lane_recip(const float (&c)[R], float eps, float otherwise) {
  const int k = threadIdx.x & (R - 1);
  float mine = c[0];
#pragma unroll
  for (int j = 1; j < R; ++j) mine = k == j ? c[j] : mine;
  return sk_recip(mine, eps, otherwise);
}

// One Sinkhorn round on the lane's row p: the row step (a row whose sum is <= eps stays), then the
// column step (a column whose sum is <= eps becomes zero). Returns the row sum; c gets the
// column sums. All R butterflies are issued in one run (rcp.rn.f32's branch between them would
// serialise them), then one column reciprocal per lane, passed round by shuffles (lane_recip).
template <int R>
__device__ __forceinline__ float lane_round(float (&p)[R], float (&c)[R], float eps) {
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < R; ++j) s += p[j];
  const float rs = sk_recip(s, eps, 1.0f);
#pragma unroll
  for (int j = 0; j < R; ++j) {
    p[j] *= rs;
    c[j] = lane_column_sum<R>(p[j]);
  }
  const float inv = lane_recip<R>(c, eps, 0.0f);
#pragma unroll
  for (int j = 0; j < R; ++j) p[j] *= __shfl_sync(0xffffffffu, inv, j, R);
  return s;
}

}  // namespace mhc
