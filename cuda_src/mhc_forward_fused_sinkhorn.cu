// Static mHC forward, strategy `fused_sinkhorn` (CUDA only): mhc_forward_fused with the Sinkhorn
// in the same launch. Each CTA (one per token) first computes M = sinkhorn(exp(L - rowmax L))
// (paper eq. 9, L = H_res_raw) in shared memory with mhc_sinkhorn_common.cuh's CTA-wide steps
// (a warp per row, a thread per column, two barriers a round), CTA 0 writes it to M for the
// backward, then the token forward runs exactly as in mhc_forward_fused (mhc_forward_fused_token.cuh).
// Why: at a few tokens the forward is bound by launches, not bytes (H100, (32, 32, 2048) bf16:
// Sinkhorn launch + fused launch ~40 us per queued call, ~25 us of it host time per launch), so
// one launch instead of two; every CTA repeats the [n, n] Sinkhorn, which only pays while the
// tokens fit about one wave (dispatch.FUSED_SINKHORN_MAX_B).
// Shared memory: P [n * n rounded up to 4 floats] then mhc_forward_fused's layout.
// Launch (mhc_aot/cuda.py: _forward_fused_sinkhorn): grid (B * THREADS, 1, 1), threadgroup
// (THREADS, 1, 1). Outputs: out [B, n, C], inv_rms [B], M [n, n].
#include "mhc_forward_fused_token.cuh"
#include "mhc_sinkhorn_common.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ H_res_raw, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, float* __restrict__ M, int n, int C, int iters, float eps) {
  extern __shared__ float smem[];
  float* P = smem;
  float* rest = smem + (n * n + 3) / 4 * 4;  // keeps the fused layout's 16-byte offsets
  const int pad = padded_streams(n);
  float* Mt = rest;
  float* hpre = Mt + n * pad;
  float* hpost = hpre + pad;
  float* scratch = hpost + pad;
  float* agg = scratch + 32;
  exp_shifted_rows(H_res_raw, P, n);
  __syncthreads();
  for (int t = 0; t < iters; ++t) {
    normalize_rows(P, n, eps, nullptr);
    __syncthreads();
    normalize_cols(P, n, eps, nullptr);
    __syncthreads();
  }
  if (blockIdx.x == 0) {
    for (int k = threadIdx.x; k < n * n; k += blockDim.x) M[k] = P[k];
  }
  stage_params(P, H_pre_raw, H_post_raw, n, Mt, hpre, hpost);
  __syncthreads();
  const size_t b = blockIdx.x;
  const T* xb = x + b * n * C;
  T* ob = out + b * n * C;
  if (vec_ok<T>(C, x, out)) {
    forward_token<Vec<T>::N>(xb, ob, inv_rms + b, w, P, Mt, hpre, hpost, agg, scratch, n, C, eps);
  } else {
    forward_token<1>(xb, ob, inv_rms + b, w, P, Mt, hpre, hpost, agg, scratch, n, C, eps);
  }
}
