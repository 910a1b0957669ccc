// Static mHC forward, strategy `column`, step 2 of 2: CTA (tile, b) sums token b's partials
// into inv_rms, recomputes agg for its TILE_C columns (x is re-read: cheap when B is small,
// which is when this strategy is chosen) and writes out for those columns.
// Launch: grid (ntiles * THREADS, B, 1), threadgroup (THREADS, 1, 1);
// shared: Mt[n * pad] + hpre[pad] + hpost[pad] + 32 + TILE_C floats.
#include "mhc_column_common.cuh"

using namespace mhc;

template <int W>
__device__ __forceinline__ void column_tile(const T* xb, T* ob, const float* w, const float* Mt, const float* hpre,
                                            const float* hpost, float* agg, int n, int C, int c0, int c1,
                                            float r) {
  aggregate_pass<T, W>(xb, hpre, n, C, c0, c1, agg);
  __syncthreads();
  mix_pass<T, W>(xb, ob, Mt, n, C, c0, c1, [&](int i0, int c, float (&acc)[IB][W]) {
    float y[W];
#pragma unroll
    for (int e = 0; e < W; ++e) y[e] = agg[c - c0 + e] * r * w[c + e];
#pragma unroll
    for (int q = 0; q < IB; ++q) {
#pragma unroll
      for (int e = 0; e < W; ++e) acc[q][e] = hpost[i0 + q] * y[e];
    }
  });
}

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ M, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, const float* __restrict__ partial,
    T* __restrict__ out, float* __restrict__ inv_rms, int n, int C, float eps) {
  extern __shared__ float smem[];
  const int pad = padded_streams(n);
  float* Mt = smem;
  float* hpre = Mt + n * pad;
  float* hpost = hpre + pad;
  float* scratch = hpost + pad;
  float* agg = scratch + 32;
  stage_params(M, H_pre_raw, H_post_raw, n, Mt, hpre, hpost);
  const int tile = blockIdx.x, b = blockIdx.y, ntiles = gridDim.x;
  float ss = 0.0f;
  for (int t = threadIdx.x; t < ntiles; t += blockDim.x) ss += partial[(size_t)b * ntiles + t];
  ss = block_sum(ss, scratch);  // also publishes the staged parameters
  const float r = rsqrtf(ss / C + eps);
  if (tile == 0 && threadIdx.x == 0) inv_rms[b] = r;
  const int c0 = tile * TILE_C, c1 = min(C, c0 + TILE_C);
  const T* xb = x + (size_t)b * n * C;
  T* ob = out + (size_t)b * n * C;
  if (vec_ok<T>(C, x, out)) {
    column_tile<Vec<T>::N>(xb, ob, w, Mt, hpre, hpost, agg, n, C, c0, c1, r);
  } else {
    column_tile<1>(xb, ob, w, Mt, hpre, hpost, agg, n, C, c0, c1, r);
  }
}
