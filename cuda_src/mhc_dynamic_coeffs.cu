// Per-token mHC coefficients (LigerMHCCoeffsFunction.forward, src/liger_kernel/ops/mhc.py) and,
// with with_pre, x_in = h_pre . x (LigerMHCPreFunction) in the same CTA. One CTA per token:
//   mix[m]  = (sum_s zpart[s, t, m]) * invr,  invr = rsqrt(sum_s sq[s, t] / K + rms_eps)   (:110-111)
//   h_pre   = sigmoid(alpha_pre mix[:n] + b[:n]) + pre_eps                                  (:452-455)
//   h_post  = sigmoid(alpha_post mix[n:2n] + b[n:2n]) * post_mult                          (:453-456)
//   h_res   = Liger's Sinkhorn(alpha_res mix[2n:] + b[2n:]) with tmax steps              (:469-498)
//   x_in[c] = sum_j h_pre[j] x[t, j, c], stored in MHC_DTYPE                              (:878-890)
// zpart / sq come from mhc_dynamic_skinny (the projection, S splits of K). mix and invr are kept
// for the backward. x_in is computed before the Sinkhorn so the token's loads overlap it.
// Inputs: x [T, n, C], zpart [S, T, M], sq [S, T], b [M], alphas [3] (pre, post, res).
// Outputs: h_pre [T, n], h_post [T, n], h_res [T, n, n], x_in [T, C] (or [1] if !with_pre),
//          mix [T, M], invr [T]. Grid (threads): (T * THREADS, 1, 1).
// Shared memory: M + n n + n + sinkhorn_floats(n, tmax, 2) floats.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ zpart, const float* __restrict__ sq,
    const float* __restrict__ b, const float* __restrict__ alphas,
    float* __restrict__ h_pre, float* __restrict__ h_post, float* __restrict__ h_res, T* __restrict__ x_in,
    float* __restrict__ mix, float* __restrict__ invr_out,
    int n, int C, int Tn, int S, int tmax, float rms_eps, float pre_eps, float sinkhorn_eps, float post_mult,
    int with_pre) {
  extern __shared__ float smem[];
  // tokens in reverse: the projection kernel read the last tokens last, some are still in L2
  const int t = gridDim.x - 1 - blockIdx.x, tid = threadIdx.x;
  const int M = n * n + 2 * n;
  float* mixs = smem;          // M
  float* L = mixs + M;         // n n residual logits
  float* hp = L + n * n;       // n
  dyn::SinkhornSmem sk{hp + n, n, tmax, 2};

  float ss = 0.0f;
  for (int s = 0; s < S; ++s) ss += sq[(size_t)s * Tn + t];
  const float invr = rsqrtf(ss / (float)(n * C) + rms_eps);
  for (int m = tid; m < M; m += THREADS) {
    float z = 0.0f;
    for (int s = 0; s < S; ++s) z += zpart[((size_t)s * Tn + t) * M + m];
    const float v = z * invr;
    mixs[m] = v;
    mix[(size_t)t * M + m] = v;
  }
  if (tid == 0) invr_out[t] = invr;
  __syncthreads();
  const float a_pre = alphas[0], a_post = alphas[1], a_res = alphas[2];
  for (int j = tid; j < n; j += THREADS) {
    const float pre = sigmoid(mixs[j] * a_pre + b[j]) + pre_eps;
    hp[j] = pre;
    h_pre[(size_t)t * n + j] = pre;
    h_post[(size_t)t * n + j] = sigmoid(mixs[n + j] * a_post + b[n + j]) * post_mult;
  }
  for (int e = tid; e < n * n; e += THREADS) L[e] = mixs[2 * n + e] * a_res + b[2 * n + e];
  __syncthreads();
  if (with_pre) dyn::aggregate_token<NMAX>(x + (size_t)t * n * C, hp, x_in + (size_t)t * C, n, C, tid, THREADS);
  const float* P = dyn::sinkhorn_forward(L, sk, sinkhorn_eps, false);
  for (int e = tid; e < n * n; e += THREADS) h_res[(size_t)t * n * n + e] = P[e];
}
