// Static mHC forward, strategy `column`, step 1 of 2: per-tile partial sums of agg^2.
// For tokens too few to fill the GPU (small B) or too wide for one CTA: CTA (tile, b) covers
// columns [tile * TILE_C, ...) of token b and writes partial[b * ntiles + tile] = sum agg^2.
// Launch: grid (ntiles * THREADS, B, 1), threadgroup (THREADS, 1, 1); shared: hpre[pad] + 32 floats.
#include "mhc_column_common.cuh"

using namespace mhc;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(const T* __restrict__ x,
                                                                 const float* __restrict__ H_pre_raw,
                                                                 float* __restrict__ partial, int n, int C) {
  extern __shared__ float smem[];
  float* hpre = smem;
  float* scratch = hpre + padded_streams(n);
  stage_params(nullptr, H_pre_raw, nullptr, n, nullptr, hpre, nullptr);
  __syncthreads();
  const int tile = blockIdx.x, b = blockIdx.y;
  const int c0 = tile * TILE_C, c1 = min(C, c0 + TILE_C);
  const T* xb = x + (size_t)b * n * C;
  const float ss = vec_ok<T>(C, x, x) ? tile_sumsq<Vec<T>::N>(xb, hpre, n, C, c0, c1)
                                      : tile_sumsq<1>(xb, hpre, n, C, c0, c1);
  const float total = block_sum(ss, scratch);
  if (threadIdx.x == 0) partial[(size_t)b * gridDim.x + tile] = total;
}
