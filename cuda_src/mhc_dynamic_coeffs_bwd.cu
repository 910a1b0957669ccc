// Backward of mhc_dynamic_coeffs, per token (LigerMHCCoeffsFunction.backward,
// src/liger_kernel/ops/mhc.py:1520-1593, with x_in's cotangent folded in):
//   dh_pre'   = dh_pre + (has_pre ? sum_c dx_in[c] x[j, c] : 0)     (LigerMHCPreFunction's grad_h)
//   dl_pre    = dh_pre' s (1 - s),  s = sigmoid(pre logits)                                (:1544)
//   dl_post   = dh_post post_mult s (1 - s)                                                  (:1551)
//   dl_res    = Sinkhorn backward of dh_res (recomputed forward with history in smem)    (:536-584)
//   dmix      = alpha_seg dl;  dz = dmix invr;  factor = -(sum(dmix mix) / invr) invr^3 / K (:1559, :291-293)
// Outputs per token: dz [T, M] and factor [T] (the x / phi gradients: mhc_dynamic_dx,
// mhc_dynamic_skinny), rows [T, M + 3] = (dl, sum(dl_pre mix_pre), sum(dl_post mix_post),
// sum(dl_res mix_res)) whose column sums (mhc_dynamic_colsum) are db and dalpha (:1563-1584).
// Inputs: x [T, n, C], mix [T, M], invr [T], b [M], alphas [3], dh_pre [T, n], dh_post [T, n],
// dh_res [T, n, n], dx_in [T, C] (or [1] if !has_pre). Grid (threads): (T * THREADS, 1, 1).
// Shared memory: 2 M + n n + n + sinkhorn_floats(n, tmax, tmax + 1) + WARPS * max(NMAX, 1) + max(NMAX, 1) floats.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ mix, const float* __restrict__ invr_in,
    const float* __restrict__ b, const float* __restrict__ alphas, const float* __restrict__ dh_pre,
    const float* __restrict__ dh_post, const float* __restrict__ dh_res, const T* __restrict__ dx_in,
    float* __restrict__ dz, float* __restrict__ factor, float* __restrict__ rows,
    int n, int C, int tmax, float sinkhorn_eps, float post_mult, int has_pre) {
  extern __shared__ float smem[];
  constexpr int NR = NMAX > 0 ? NMAX : 1;
  const int t = blockIdx.x, tid = threadIdx.x;
  const int M = n * n + 2 * n;
  float* mixs = smem;              // M
  float* dl = mixs + M;            // M
  float* L = dl + M;               // n n logits
  float* dots = L + n * n;         // n
  float* scratch = dots + n;       // WARPS * NR + NR
  dyn::SinkhornSmem sk{scratch + dyn::WARPS * NR + NR, n, tmax, tmax + 1};

  for (int m = tid; m < M; m += THREADS) mixs[m] = mix[(size_t)t * M + m];
  for (int j = tid; j < n; j += THREADS) dots[j] = 0.0f;
  __syncthreads();
  if (has_pre) dyn::stream_dots<NMAX>(x + (size_t)t * n * C, dx_in + (size_t)t * C, n, C, scratch, dots);
  const float a_pre = alphas[0], a_post = alphas[1], a_res = alphas[2];
  for (int j = tid; j < n; j += THREADS) {
    float s = sigmoid(mixs[j] * a_pre + b[j]);
    dl[j] = (dh_pre[(size_t)t * n + j] + dots[j]) * (s * (1.0f - s));
    s = sigmoid(mixs[n + j] * a_post + b[n + j]);
    dl[n + j] = dh_post[(size_t)t * n + j] * (post_mult * s * (1.0f - s));
  }
  float* G = dl + 2 * n;
  for (int e = tid; e < n * n; e += THREADS) {
    L[e] = mixs[2 * n + e] * a_res + b[2 * n + e];
    G[e] = dh_res[(size_t)t * n * n + e];
  }
  __syncthreads();
  dyn::sinkhorn_forward(L, sk, sinkhorn_eps, true);
  dyn::sinkhorn_backward(G, sk, sinkhorn_eps);  // dl[2n:] = dlogits of h_res

  const float invr = invr_in[t];
  for (int m = tid; m < M; m += THREADS) {
    const float a = m < n ? a_pre : m < 2 * n ? a_post : a_res;
    dz[(size_t)t * M + m] = dl[m] * a * invr;
    rows[(size_t)t * (M + 3) + m] = dl[m];
  }
  if (tid == 0) {  // serial sums in a fixed order: deterministic
    float g = 0.0f, sp = 0.0f, so = 0.0f, sr = 0.0f;
    for (int m = 0; m < M; ++m) {
      const float a = m < n ? a_pre : m < 2 * n ? a_post : a_res;
      g += dl[m] * a * mixs[m];
      const float dm = dl[m] * mixs[m];
      if (m < n) sp += dm; else if (m < 2 * n) so += dm; else sr += dm;
    }
    g = g / invr;
    factor[t] = (-g * invr * invr * invr) / (float)(n * C);
    rows[(size_t)t * (M + 3) + M] = sp;
    rows[(size_t)t * (M + 3) + M + 1] = so;
    rows[(size_t)t * (M + 3) + M + 2] = sr;
  }
}
