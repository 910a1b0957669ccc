// Per-token mHC coefficients (LigerMHCCoeffsFunction.forward, src/liger_kernel/ops/mhc.py) and,
// with with_pre, x_in = h_pre . x (LigerMHCPreFunction) in the same CTA (mode 0). Per token:
//   mix[m]  = (sum_s zpart[s, t, m]) * invr,  invr = rsqrt(sum_s sq[s, t] / K + rms_eps)   (:110-111)
//   h_pre   = sigmoid(alpha_pre mix[:n] + b[:n]) + pre_eps                                  (:452-455)
//   h_post  = sigmoid(alpha_post mix[n:2n] + b[n:2n]) * post_mult                          (:453-456)
//   h_res   = Liger's Sinkhorn(alpha_res mix[2n:] + b[2n:]) with tmax steps              (:469-498)
//   x_in[c] = sum_j h_pre[j] x[t, j, c], stored in MHC_DTYPE                              (:878-890)
// zpart / sq come from the projection (mhc_dynamic_proj_tc or mhc_dynamic_skinny, S splits of K).
// mix and invr are kept for the backward.
// Three modes (`lanes`):
//   0: one CTA per token (any n): the per-token math spread over the CTA; for n <= dyn::LANE_N warp 0
//      runs the Sinkhorn a lane per element while the others form x_in, else x_in comes before the
//      CTA's Sinkhorn. Grid (threads): (T * THREADS, 1, 1), block THREADS; shared memory:
//      M + n n + n + max(sinkhorn_floats(n, tmax, 2), 32 WARPS) floats.
//   lanes (a power of two >= n, <= 32): `lanes` threads of a warp per token (dyn::LaneGroup), each
//      group its own `slice` of shared memory (the same layout; slice odd, so neighbouring slices
//      start in different banks); with_pre must be 0 (mhc_dynamic_pre computes x_in, a pure stream
//      over x that no Sinkhorn holds back). Grid (threads): (ceil(T lanes / blockDim) * blockDim, 1, 1);
//      shared memory: blockDim / lanes * slice floats.
//   lanes = ELEMS (-2): the element mode (n <= dyn::LANE_N): a half-warp per token, a lane per
//      matrix element (dyn::sinkhorn_forward_lanes). The alphas and b, which every token reads,
//      come through shared memory, one global load each per CTA: loaded by every warp, they were
//      the same few addresses requested by each of T / 2 warps at the kernel's start, queued at
//      their L2 slices (ncu, H200, T = 8192, n = 4: 37-39 us, a third of the warps' stall samples
//      on the alphas' load, an L2 slice far busier than the others; one load per CTA of 128
//      threads: 26.7 us, still 60% of the samples waiting on it). So the CTAs are large
//      (ELEMS_THREADS in mhc_aot/cuda_dynamic.py, at most MAX_BLOCK): fewer requests to those
//      addresses. That one load waited on the alphas' memory (MLX keeps arrays of <= 8 bytes in a
//      managed, read-mostly pool: 25-30 us, against 11-12 from an ordinary array; ncu, H100, T = 8192,
//      n = 4; docs/HISTORY.md, session 18): on the tensor-core path the launcher passes views of
//      mhc_dynamic_phi_split's copy of the alphas and b instead (mhc_aot/cuda_dynamic.py, _from_consts).
//      Grid (threads): (ceil(16 T / blockDim) * blockDim, 1, 1); shared memory: 3 + M floats.
// Inputs: x [T, n, C], zpart [S, T, M], sq [S, T], b [M], alpha_pre, alpha_post, alpha_res (float32
// scalars, read once: separate inputs, so no stacking op runs before the launch).
// Outputs: h_pre [T, n], h_post [T, n], h_res [T, n, n], x_in [T, C] (or [1] if !with_pre),
//          mix [T, M], invr [T].
#include "mhc_dynamic_coeffs.cuh"

using namespace mhc;

namespace {
constexpr int ELEMS = -2;         // `lanes` of the element mode (mhc_aot/cuda_dynamic.py)
constexpr int MAX_BLOCK = 1024;   // threads per CTA at most: the element mode's ELEMS_THREADS
// Token t's coefficients by a half-warp, a lane per matrix element (n <= dyn::LANE_N): the values of
// token_coeffs in lane mode and of the backward's recompute (mhc_dynamic_coeffs_bwd), the same
// operations in the same order (lane l16 sums its own entries' S partials in split order).
// `valid`: t < T; a half-warp past the end still runs (its warp's shuffles need every lane) on
// token T - 1 and writes nothing.
__device__ __forceinline__ void token_coeffs_elems(
    int t, bool valid, int lane, const float* __restrict__ zpart, const float* __restrict__ sq,
    const float* b, float a_pre, float a_post, float a_res, float* __restrict__ h_pre,
    float* __restrict__ h_post, float* __restrict__ h_res, float* __restrict__ mix, float* __restrict__ invr_out,
    int n, int C, int Tn, int S, int tmax, float rms_eps, float pre_eps, float sinkhorn_eps, float post_mult) {
  const int M = n * n + 2 * n, l16 = lane % 16;
  const bool elem = l16 < n * n, act = l16 < n;  // act: the lane of stream l16's pre / post entries
  float ss = 0.0f, zp = 0.0f, zo = 0.0f, zr = 0.0f;
  for (int s = 0; s < S; ++s) {
    const float* row = zpart + ((size_t)s * Tn + t) * M;
    ss += sq[(size_t)s * Tn + t];
    if (act) {
      zp += row[l16];
      zo += row[n + l16];
    }
    if (elem) zr += row[2 * n + l16];
  }
  const float invr = rsqrtf(ss / (float)(n * C) + rms_eps);
  const float vr = zr * invr;
  float* mt = mix + (size_t)t * M;
  if (valid) {
    if (l16 == 0) invr_out[t] = invr;
    if (act) {
      const float vp = zp * invr, vo = zo * invr;
      mt[l16] = vp;
      mt[n + l16] = vo;
      h_pre[(size_t)t * n + l16] = sigmoid(vp * a_pre + b[l16]) + pre_eps;
      h_post[(size_t)t * n + l16] = sigmoid(vo * a_post + b[n + l16]) * post_mult;
    }
    if (elem) mt[2 * n + l16] = vr;
  }
  const float L = elem ? vr * a_res + b[2 * n + l16] : 0.0f;
  const float P = dyn::sinkhorn_forward_lanes(L, n, tmax, sinkhorn_eps, lane);
  if (valid && elem) h_res[(size_t)t * n * n + l16] = P;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(MAX_BLOCK) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ zpart, const float* __restrict__ sq,
    const float* __restrict__ b, const float* __restrict__ alpha_pre, const float* __restrict__ alpha_post,
    const float* __restrict__ alpha_res,
    float* __restrict__ h_pre, float* __restrict__ h_post, float* __restrict__ h_res, T* __restrict__ x_in,
    float* __restrict__ mix, float* __restrict__ invr_out,
    int n, int C, int Tn, int S, int tmax, float rms_eps, float pre_eps, float sinkhorn_eps, float post_mult,
    int with_pre, int lanes, int slice) {
  extern __shared__ float smem[];
  if (lanes == ELEMS) {  // a lane per matrix element, 16 lanes a token: n <= dyn::LANE_N
    // the alphas and b, read by every token: one load each per CTA (the header says why)
    const int M = n * n + 2 * n;
    if (threadIdx.x < 3 + M) {
      const int i = threadIdx.x;
      smem[i] = i == 0 ? *alpha_pre : i == 1 ? *alpha_post : i == 2 ? *alpha_res : b[i - 3];
    }
    __syncthreads();
    const int g = blockIdx.x * blockDim.x + threadIdx.x, t = g / 16;
    token_coeffs_elems(min(t, Tn - 1), t < Tn, threadIdx.x % 32, zpart, sq, smem + 3, smem[0], smem[1], smem[2],
                       h_pre, h_post, h_res, mix, invr_out, n, C, Tn, S, tmax, rms_eps, pre_eps, sinkhorn_eps,
                       post_mult);
    return;
  }
  const float a_pre = *alpha_pre, a_post = *alpha_post, a_res = *alpha_res;
  if (lanes) {
    const int t = (blockIdx.x * blockDim.x + threadIdx.x) / lanes;
    if (t < Tn)  // a whole group leaves together: its __syncwarp masks stay complete
      dyn::token_coeffs(dyn::LaneGroup(lanes), smem + (size_t)(threadIdx.x / lanes) * slice, t, x, zpart, sq, b, a_pre, a_post, a_res,
                   h_pre, h_post, h_res, x_in, mix, invr_out, n, C, Tn, S, tmax, rms_eps, pre_eps, sinkhorn_eps,
                   post_mult, false);
    return;
  }
  // tokens in reverse: the projection kernel read the last tokens last, some are still in L2
  const int t = gridDim.x - 1 - blockIdx.x;
  dyn::token_coeffs(dyn::CtaGroup{}, smem, t, x, zpart, sq, b, a_pre, a_post, a_res, h_pre, h_post, h_res, x_in, mix, invr_out, n, C,
               Tn, S, tmax, rms_eps, pre_eps, sinkhorn_eps, post_mult, with_pre != 0);
}
