// Static mHC forward, strategy `fused_sinkhorn` (CUDA only; n <= 32): mhc_forward_fused with the
// Sinkhorn in the same launch. Each CTA (one per token) first computes
// M = sinkhorn(exp(L - rowmax L)) (paper eq. 9, L = H_res_raw) in registers: warp w holds rows
// w, w + NW, ... (lane = column; NW = THREADS / 32 warps, so n <= 32 rows take 4 per warp), row
// sums by warp shuffles, column sums from each warp's partial over its rows through a
// double-buffered [2][NW][32] shared array (one barrier a round), one reciprocal per lane each.
// CTA 0 writes M for the backward; then the token forward runs exactly as mhc_forward_fused's
// (mhc_forward_fused_token.cuh).
// Why: at a few tokens the forward is bound by launches, not bytes (H100, (32, 32, 2048) bf16:
// Sinkhorn launch + fused launch ~40 us per queued call), so one launch instead of two. Every CTA
// repeats the Sinkhorn, which only pays while the tokens fit about one wave
// (dispatch.FUSED_SINKHORN_MAX_B). A first version ran the CTA-wide steps of
// mhc_sinkhorn_common.cuh (a thread per column walking the rows, two barriers a round): ~2x slower
// than the two launches it replaced.
// Shared memory: P [max(n * n, 2 * NW * 32) rounded up to 4 floats] then mhc_forward_fused's layout.
// Launch (mhc_aot/cuda.py: _forward_fused_sinkhorn): grid (B * THREADS, 1, 1), threadgroup
// (THREADS, 1, 1). Outputs: out [B, n, C], inv_rms [B], M [n, n].
#include "mhc_forward_fused_token.cuh"
#include "mhc_sinkhorn_common.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ H_res_raw, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, float* __restrict__ M, int n, int C, int iters, float eps) {
  extern __shared__ float smem[];
  constexpr int NW = THREADS / 32, RPW = 32 / NW;  // warps; rows per warp (n <= 32)
  float* P = smem;
  float* rest = smem + ((n * n > 2 * NW * 32 ? n * n : 2 * NW * 32) + 3) / 4 * 4;  // keeps the fused layout's 16-byte offsets
  const int pad = padded_streams(n);
  float* Mt = rest;
  float* hpre = Mt + n * pad;
  float* hpost = hpre + pad;
  float* scratch = hpost + pad;
  float* agg = scratch + 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float p[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int i = warp + r * NW;
    const bool ok = i < n && lane < n;
    const float v = ok ? H_res_raw[i * n + lane] : -INFINITY;
    const float m = warp_max(v);  // every lane shuffles
    p[r] = ok ? expf(v - m) : 0.0f;
  }
  for (int t = 0; t < iters; ++t) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) p[r] *= sk_recip(warp_sum(p[r]), eps, 1.0f);  // row step
    float* part = P + (t & 1) * NW * 32;  // column step: this warp's rows, then every warp's in order
    float cp = 0.0f;
#pragma unroll
    for (int r = 0; r < RPW; ++r) cp += p[r];
    part[warp * 32 + lane] = cp;
    __syncthreads();
    float c = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; ++w) c += part[w * 32 + lane];
    const float inv = sk_recip(c, eps, 0.0f);
#pragma unroll
    for (int r = 0; r < RPW; ++r) p[r] *= inv;
  }
  __syncthreads();  // every warp is done with the column partials: P takes M
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int i = warp + r * NW;
    if (i < n && lane < n) P[i * n + lane] = p[r];
  }
  __syncthreads();
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
