// Static mHC forward, strategy `fused`: one CTA per token, x read from DRAM once.
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
// Pass 1 streams x from DRAM and keeps agg (C floats) in shared memory; pass 2 re-reads the
// token, which this CTA has just pulled into L1/L2, and writes out. inv_rms is saved for the
// backward. Shared memory: Mt[n * pad] + hpre[pad] + hpost[pad] + agg[C] + 32 floats.
// Launch: grid (B * THREADS, 1, 1), threadgroup (THREADS, 1, 1).
#include "mhc_token_passes.cuh"

using namespace mhc;

template <int W>
__device__ __forceinline__ void forward_token(const T* xb, T* ob, float* inv_rms, const float* w, const float* Mt,
                                              const float* hpre, const float* hpost, float* agg, float* scratch,
                                              int n, int C, float eps) {
  const float ss = block_sum(aggregate_pass<T, W>(xb, hpre, n, C, 0, C, agg), scratch);
  const float r = rsqrtf(ss / C + eps);
  if (threadIdx.x == 0) *inv_rms = r;
  mix_pass<T, W>(xb, ob, Mt, n, C, 0, C, [&](int i0, int c, float (&acc)[IB][W]) {
    float y[W];
#pragma unroll
    for (int e = 0; e < W; ++e) y[e] = agg[c + e] * r * w[c + e];
#pragma unroll
    for (int q = 0; q < IB; ++q) {
#pragma unroll
      for (int e = 0; e < W; ++e) acc[q][e] = hpost[i0 + q] * y[e];
    }
  });
}

// Small n needs few registers: ask for 5 CTAs per SM (6 spills) so one CTA's loads overlap
// another's math (ncu on the H100 at (4096, 4, 4096): 54 registers gave 4 CTAs/SM, 64% of DRAM).
constexpr int MIN_BLOCKS = (NMAX > 0 && NMAX <= 4) ? 5 : 2;

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ M, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, int n, int C, float eps) {
  extern __shared__ float smem[];
  const int pad = padded_streams(n);
  float* Mt = smem;
  float* hpre = Mt + n * pad;
  float* hpost = hpre + pad;
  float* scratch = hpost + pad;
  float* agg = scratch + 32;
  stage_params(M, H_pre_raw, H_post_raw, n, Mt, hpre, hpost);
  __syncthreads();
  const size_t b = blockIdx.x;
  const T* xb = x + b * n * C;
  T* ob = out + b * n * C;
  if (vec_ok<T>(C, x, out)) {
    forward_token<Vec<T>::N>(xb, ob, inv_rms + b, w, Mt, hpre, hpost, agg, scratch, n, C, eps);
  } else {
    forward_token<1>(xb, ob, inv_rms + b, w, Mt, hpre, hpost, agg, scratch, n, C, eps);
  }
}
