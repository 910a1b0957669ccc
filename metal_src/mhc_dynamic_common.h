// Shared by the dynamic-mHC Metal kernels (metal_src/mhc_dynamic_*.metal): block sums of several
// values at once and the per-token stream dot products. Mirrors the token-pass part of
// cuda_src/mhc_dynamic_common.cuh; its Sinkhorn and tensor-core helpers serve CUDA kernels that
// have no Metal twin yet (the coefficients run as MLX ops on Metal: mhc_aot/dispatch.py).
//
// Conventions as every mhc-aot kernel: float32 math, x / f / their gradients in MHC_DTYPE,
// coefficients float32; one threadgroup of mhc::THREADS threads per token.
#pragma once

#include "mhc_common.h"

namespace mhc {
namespace {

// Sums R values over the threadgroup: out[q] (threadgroup, R floats) = sum over threads of v[q],
// simdgroups added in order (deterministic). `scratch` holds NSIMD * R floats. Starts and ends
// synchronised; every thread must call it.
template <int R>
inline void block_sum_n(thread float (&v)[R], threadgroup float* scratch, threadgroup float* out, Tid t) {
  for (int q = 0; q < R; ++q) v[q] = simd_sum(v[q]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (t.lane == 0) {
    for (int q = 0; q < R; ++q) scratch[t.sg * R + q] = v[q];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int q = int(t.tid); q < R; q += THREADS) {
    float s = 0.0f;
    for (int w = 0; w < NSIMD; ++w) s += scratch[w * R + q];
    out[q] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// dots[j] = sum_c g[c] x[j, c] for j < n, one token: x [n, C], g [C] (both T, row-major).
// Compile-time NM >= n: one pass over the token with NM accumulators per thread; NM = 0: one block
// reduction per stream (x re-read per stream, from cache). `scratch`: NSIMD * max(NM, 1) + max(NM, 1)
// floats; `dots`: n floats (threadgroup). Every thread must call it.
template <int NM>
inline void stream_dots(device const T* x, device const T* g, int n, int C, threadgroup float* scratch,
                        threadgroup float* dots, Tid t) {
  constexpr int NA = NM > 0 ? NM : 1;
  const bool vec = vec_ok(C);
  const int W = vec ? VEC : 1, units = vec ? C / VEC : C;
  if (NM > 0) {
    float acc[NA];
    for (int j = 0; j < NA; ++j) acc[j] = 0.0f;
    for (int u = int(t.tid); u < units; u += THREADS) {
      for (int e = 0; e < W; ++e) {  // W is VEC or 1: the same sums, in column order, either way
        const float gc = to_float(g[u * W + e]);
        for (int j = 0; j < NA; ++j)
          if (j < n) acc[j] += gc * to_float(x[size_t(j) * C + u * W + e]);
      }
    }
    block_sum_n<NA>(acc, scratch, scratch + NSIMD * NA, t);  // NA sums: dots may hold only n floats
    for (int j = int(t.tid); j < n; j += THREADS) dots[j] = scratch[NSIMD * NA + j];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    for (int j = 0; j < n; ++j) {
      float acc[1] = {0.0f};
      device const T* xj = x + size_t(j) * C;
      for (int c = int(t.tid); c < C; c += THREADS) acc[0] += to_float(g[c]) * to_float(xj[c]);
      block_sum_n<1>(acc, scratch, dots + j, t);
    }
  }
}

}  // namespace
}  // namespace mhc
