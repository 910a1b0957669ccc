// Pieces of the one-CTA Sinkhorn-Knopp kernels (forward and backward). Mirrored by
// metal_src/mhc_sinkhorn_common.h. A warp owns a row (lanes stride its columns); a thread owns a
// column (rows walked in order, consecutive threads on consecutive columns: coalesced).
#pragma once

#include "mhc_common.cuh"

namespace mhc {

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
    const float scale = s > eps ? 1.0f / s : 1.0f;
    for (int j = lane; j < n; j += 32) P[i * n + j] *= scale;
  }
}

// Column step: c_j = sum_i P[i, j]; P[:, j] *= (c_j > eps ? 1 / c_j : 0). Saves c to `sums` if given.
__device__ __forceinline__ void normalize_cols(float* P, int n, float eps, float* sums) {
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += P[i * n + j];
    if (sums) sums[j] = s;
    const float scale = s > eps ? 1.0f / s : 0.0f;
    for (int i = 0; i < n; ++i) P[i * n + j] *= scale;
  }
}

}  // namespace mhc
