// Tiling shared by the two `column` forward kernels. Mirrored by metal_src/mhc_column_common.h.
#pragma once

#include "mhc_token_passes.cuh"

namespace mhc {

constexpr int TILE_C = 1024;  // columns per CTA: a B=1 token of C=8192 spreads over 8 CTAs

// Sum of agg^2 over columns [c0, c1) of one token (this thread's share).
template <int W>
__device__ __forceinline__ float tile_sumsq(const T* xb, const float* hpre, int n, int C, int c0, int c1) {
  float ss = 0.0f;
  for (int c = c0 + threadIdx.x * W; c < c1; c += blockDim.x * W) {
    float a[W] = {};
    for_streams<(W == 1 ? 0 : NMAX)>(n, [&](int j) {
      float xv[W];
      load_w<T, W>(xb + (size_t)j * C + c, xv);
#pragma unroll
      for (int e = 0; e < W; ++e) a[e] = fmaf(hpre[j], xv[e], a[e]);
    });
#pragma unroll
    for (int e = 0; e < W; ++e) ss = fmaf(a[e], a[e], ss);
  }
  return ss;
}

}  // namespace mhc
