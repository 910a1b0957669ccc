// Pieces of the one-threadgroup Sinkhorn-Knopp kernels (forward and backward). Mirrors
// cuda_src/mhc_sinkhorn_common.cuh. A simdgroup owns a row (lanes stride its columns); a thread
// owns a column (rows walked in order, consecutive threads on consecutive columns).
// The working matrix P is a threadgroup or a device pointer (template parameter Ptr): the
// forward keeps it in threadgroup memory when it fits, else works in place in its output.
// These general-n helpers assume THREADS threads; n <= SMALL_N runs with SMALL_THREADS.
#pragma once

#include "mhc_common.h"

namespace mhc {
namespace {

// P[i, :] = exp(L[i, :] - max_j L[i, j]).
template <typename Ptr>
inline void exp_shifted_rows(device const float* L, Ptr P, int n, Tid t) {
  for (int i = int(t.sg); i < n; i += NSIMD) {
    float m = -INFINITY;
    for (int j = int(t.lane); j < n; j += SIMD) m = fmax(m, L[i * n + j]);
    m = simd_max(m);
    for (int j = int(t.lane); j < n; j += SIMD) P[i * n + j] = precise::exp(L[i * n + j] - m);
  }
}

// Row step: r_i = sum_j P[i, j]; P[i, :] *= (r_i > eps ? 1 / r_i : 1). Saves r to `sums` if given.
template <typename Ptr>
inline void normalize_rows(Ptr P, int n, float eps, device float* sums, Tid t) {
  for (int i = int(t.sg); i < n; i += NSIMD) {
    float s = 0.0f;
    for (int j = int(t.lane); j < n; j += SIMD) s += P[i * n + j];
    s = simd_sum(s);
    if (sums != nullptr && t.lane == 0) sums[i] = s;
    const float scale = s > eps ? 1.0f / s : 1.0f;
    for (int j = int(t.lane); j < n; j += SIMD) P[i * n + j] *= scale;
  }
}

// Column step: c_j = sum_i P[i, j]; P[:, j] *= (c_j > eps ? 1 / c_j : 0). Saves c to `sums` if given.
template <typename Ptr>
inline void normalize_cols(Ptr P, int n, float eps, device float* sums, Tid t) {
  for (int j = int(t.tid); j < n; j += THREADS) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += P[i * n + j];
    if (sums != nullptr) sums[j] = s;
    const float scale = s > eps ? 1.0f / s : 0.0f;
    for (int i = 0; i < n; ++i) P[i * n + j] *= scale;
  }
}

// ---------------------------------------------------------------- n <= 32: one simdgroup per row
// With n <= 32 and SMALL_THREADS threads, thread (i = simdgroup, j = lane) keeps P[i, j] in a
// register: row sums are simdgroup reductions; column sums go through a transposed threadgroup
// tile T[j * 33 + i] (padded: no bank conflicts) and a reduction by the simdgroup that owns the
// column. Two barriers per iteration instead of a serial pass per column.
constant constexpr int SMALL_N = 32;
constant constexpr int SMALL_THREADS = SIMD * SMALL_N;
constant constexpr int TILE = SMALL_N * (SMALL_N + 1);

// Column sums of the register tile: returns sum_i P[i, j] to every thread of column j.
// `T` holds TILE floats, `col` SMALL_N floats.
inline float column_sum(float p, threadgroup float* T, threadgroup float* col, Tid t) {
  const int i = int(t.sg), j = int(t.lane);
  T[j * (SMALL_N + 1) + i] = p;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float s = simd_sum(T[i * (SMALL_N + 1) + j]);  // simdgroup i sums column i
  if (j == 0) col[i] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return col[j];
}

}  // namespace
}  // namespace mhc
