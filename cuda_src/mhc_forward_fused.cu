// Static mHC forward, strategy `fused`: one CTA per token, x read from DRAM once.
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
// Pass 1 streams x from DRAM and keeps agg (C floats) in shared memory; pass 2 re-reads the
// token, which this CTA has just pulled into L1/L2, and writes out. inv_rms is saved for the
// backward. Shared memory: Mt[n * pad] + hpre[pad] + hpost[pad] + agg[C] + 32 floats.
// Launch: grid (B * THREADS, 1, 1), threadgroup (THREADS, 1, 1).
// Tensor-core pass 2 (CUDA only; the Metal twin keeps the CUDA-core mix): bfloat16 x, n == NMAX in
// {16, 32}, C a multiple of TC_COLS and 16-byte rows. There the mix, n^2 multiply-adds per column,
// is what bounds the CUDA-core pass (ncu, H100, (1024, 32, 2048): 341 us, 25% of the copy roof);
// on mma.sync it is memory-bound again. M is split into two bfloat16 terms (hi + lo, 2^-17
// relative: far below the bfloat16 output's rounding), held as A fragments for the whole token;
// x arrives in TC_STAGES cp.async chunks of n x TC_COLS (a swizzled ring after agg, 16-byte
// aligned: cuda._fused_tc_ring_floats more shared floats, added by the launcher under the same
// condition) and is read by ldmatrix.trans as B fragments. Each warp owns 16 columns of a chunk.
#include "mhc_forward_fused_token.cuh"

using namespace mhc;

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
    forward_token<Vec<T>::N>(xb, ob, inv_rms + b, w, M, Mt, hpre, hpost, agg, scratch, n, C, eps);
  } else {
    forward_token<1>(xb, ob, inv_rms + b, w, M, Mt, hpre, hpost, agg, scratch, n, C, eps);
  }
}
