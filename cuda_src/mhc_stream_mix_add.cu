// out[b, i, c] = sum_j M[i, j] x[b, j, c] + bias[b, i, c]: the MHCRewire post-combine in one pass
// (x and bias read once, out written once). CTA (tile, b) covers TILE_C columns of token b.
// Launch: grid (ntiles * THREADS, B, 1), threadgroup (THREADS, 1, 1); shared: Mt[n * pad] floats.
#include "mhc_column_common.cuh"

using namespace mhc;

template <int W>
__device__ __forceinline__ void mix_add_tile(const T* xb, const T* bb, T* ob, const float* Mt, int n, int C, int c0,
                                             int c1) {
  mix_pass<T, W>(xb, ob, Mt, n, C, c0, c1, [&](int i0, int c, float (&acc)[IB][W]) {
#pragma unroll
    for (int q = 0; q < IB; ++q) {
      if (i0 + q < n) {
        load_w<T, W>(bb + (size_t)(i0 + q) * C + c, acc[q]);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) acc[q][e] = 0.0f;
      }
    }
  });
}

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(const T* __restrict__ x, const float* __restrict__ M,
                                                                 const T* __restrict__ bias, T* __restrict__ out,
                                                                 int n, int C) {
  extern __shared__ float smem[];
  stage_params(M, nullptr, nullptr, n, smem, nullptr, nullptr);
  __syncthreads();
  const int tile = blockIdx.x, b = blockIdx.y;
  const int c0 = tile * TILE_C, c1 = min(C, c0 + TILE_C);
  const size_t off = (size_t)b * n * C;
  if (vec_ok<T>(C, x, out, bias)) {
    mix_add_tile<Vec<T>::N>(x + off, bias + off, out + off, smem, n, C, c0, c1);
  } else {
    mix_add_tile<1>(x + off, bias + off, out + off, smem, n, C, c0, c1);
  }
}
