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
// Inputs: x [T, n, C], mix [T, M], invr [T], b [M], alpha_pre, alpha_post, alpha_res (float32
// scalars), dh_pre [T, n], dh_post [T, n], dh_res [T, n, n], dx_in [T, C] (or any array if !has_pre),
// dots [T, n] (or any array: see lanes).
// has_dh_pre = 0 (mode 0 only): dh_pre is zero and not read. The layer discards h_pre, and MLX would
// fill its zero cotangent in a launch of its own (~5 us and a launch a backward, H200, session 33); in
// the lane modes the launcher passes the dots as dh_pre instead, with has_pre = 0.
// Three modes (`lanes`), as mhc_dynamic_coeffs:
//   0: one CTA per token, the stream dots sum_c dx_in[c] x[j, c] computed here.
//      Grid (threads): (T * THREADS, 1, 1), block THREADS. Shared memory: 2 M + n n + n +
//      sinkhorn_floats(n, tmax, tmax + 1) + WARPS * max(NMAX, 1) + max(NMAX, 1) floats.
//   lanes (a power of two >= n, <= 32): a lane group per token (dyn::LaneGroup); the dots come
//      precomputed in `dots` (mhc_dynamic_pre_bwd without dx, a pure stream over x); each group its
//      own `slice` (odd) of shared memory: 2 M + n n + n + sinkhorn_floats(n, tmax, tmax + 1)
//      floats. Grid (threads): (ceil(T lanes / blockDim) * blockDim, 1, 1); shared memory:
//      blockDim / lanes * slice floats.
//   lanes = ELEMS (-2): the element mode (n <= dyn::LANE_N): a half-warp per token, a lane per matrix
//      element (dyn::sinkhorn_forward_lanes_k with the history, dyn::sinkhorn_backward_lanes), the
//      history in the half-warp's `slice` (odd): sinkhorn_floats(n, tmax, tmax + 1) floats. The chain
//      of ~4 tmax phases that a thread per token ran alone (the register mode until session 33, ~2
//      warps an SM) is shared by 16 lanes, and 16x the warps hide each other. Grid (threads):
//      (ceil(16 T / blockDim) * blockDim, 1, 1); shared memory: blockDim / 16 * slice floats.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

namespace {
// Token t's backward, run by group g (the CTA or a lane group) on `base` (shared memory laid out as
// the header says; `scratch` is the CTA's block-reduction space, absent for a lane group).
template <class G>
__device__ __forceinline__ void token_coeffs_bwd(
    G g, float* base, int t, const T* __restrict__ x, const float* __restrict__ mix,
    const float* __restrict__ invr_in, const float* __restrict__ b, float a_pre, float a_post, float a_res,
    const float* __restrict__ dh_pre, const float* __restrict__ dh_post, const float* __restrict__ dh_res,
    const T* __restrict__ dx_in, const float* __restrict__ dots_in, float* __restrict__ dz,
    float* __restrict__ factor, float* __restrict__ rows, int n, int C, int tmax, float sinkhorn_eps,
    float post_mult, int has_pre) {
  constexpr int NR = NMAX > 0 ? NMAX : 1;
  constexpr int SCRATCH = G::cta ? dyn::WARPS * NR + NR : 0;
  const int M = n * n + 2 * n;
  float* mixs = base;              // M
  float* dl = mixs + M;            // M
  float* L = dl + M;               // n n logits
  float* dots = L + n * n;         // n
  float* scratch = dots + n;       // SCRATCH
  dyn::SinkhornSmem sk{scratch + SCRATCH, n, tmax, tmax + 1};

  for (int m = g.rank; m < M; m += g.size) mixs[m] = mix[(size_t)t * M + m];
  for (int j = g.rank; j < n; j += g.size) dots[j] = (has_pre && !G::cta) ? dots_in[(size_t)t * n + j] : 0.0f;
  g.sync();
  if constexpr (G::cta) {
    if (has_pre) dyn::stream_dots<NMAX>(x + (size_t)t * n * C, dx_in + (size_t)t * C, n, C, scratch, dots);
  }
  for (int j = g.rank; j < n; j += g.size) {
    float s = sigmoid(mixs[j] * a_pre + b[j]);
    dl[j] = ((dh_pre ? dh_pre[(size_t)t * n + j] : 0.0f) + dots[j]) * (s * (1.0f - s));
    s = sigmoid(mixs[n + j] * a_post + b[n + j]);
    dl[n + j] = dh_post[(size_t)t * n + j] * (post_mult * s * (1.0f - s));
  }
  float* Gm = dl + 2 * n;
  for (int e = g.rank; e < n * n; e += g.size) {
    L[e] = mixs[2 * n + e] * a_res + b[2 * n + e];
    Gm[e] = dh_res[(size_t)t * n * n + e];
  }
  g.sync();
  dyn::sinkhorn_forward(L, sk, sinkhorn_eps, true, g);
  dyn::sinkhorn_backward(Gm, sk, sinkhorn_eps, g);  // dl[2n:] = dlogits of h_res

  const float invr = invr_in[t];
  for (int m = g.rank; m < M; m += g.size) {
    const float a = m < n ? a_pre : m < 2 * n ? a_post : a_res;
    dz[(size_t)t * M + m] = dl[m] * a * invr;
    rows[(size_t)t * (M + 3) + m] = dl[m];
  }
  if (g.rank == 0) {  // serial sums in a fixed order: deterministic
    float gs = 0.0f, sp = 0.0f, so = 0.0f, sr = 0.0f;
    for (int m = 0; m < M; ++m) {
      const float a = m < n ? a_pre : m < 2 * n ? a_post : a_res;
      gs += dl[m] * a * mixs[m];
      const float dm = dl[m] * mixs[m];
      if (m < n) sp += dm; else if (m < 2 * n) so += dm; else sr += dm;
    }
    gs = gs / invr;
    factor[t] = (-gs * invr * invr * invr) / (float)(n * C);
    rows[(size_t)t * (M + 3) + M] = sp;
    rows[(size_t)t * (M + 3) + M + 1] = so;
    rows[(size_t)t * (M + 3) + M + 2] = sr;
  }
}

constexpr int ELEMS = -2;  // `lanes` of the element mode (mhc_aot/cuda_dynamic.py)

// Token t's backward by a half-warp, a lane per matrix element (n <= dyn::LANE_N): lane l16 < n also
// takes pre / post entry l16. The values of token_coeffs_bwd up to rounding: the Sinkhorn's dot products
// add lane products (see dyn::sinkhorn_backward_lanes) and the four serial sums are butterfly sums over
// the half-warp (a fixed order: deterministic). `valid`: t < T; a half-warp past the end runs
// on token T - 1 (its warp's shuffles need every lane) and writes nothing.
__device__ __forceinline__ void token_coeffs_bwd_elems(
    float* hist, int t, bool valid, int lane, const float* __restrict__ mix, const float* __restrict__ invr_in,
    const float* __restrict__ b, float a_pre, float a_post, float a_res, const float* __restrict__ dh_pre,
    const float* __restrict__ dh_post, const float* __restrict__ dh_res, const float* __restrict__ dots_in,
    float* __restrict__ dz, float* __restrict__ factor, float* __restrict__ rows, int n, int C, int tmax,
    float sinkhorn_eps, float post_mult, int has_pre) {
  const int M = n * n + 2 * n, l16 = lane % 16;
  const bool elem = l16 < n * n, act = l16 < n;
  const float* mt = mix + (size_t)t * M;
  float mpre = 0.0f, mpost = 0.0f, dlpre = 0.0f, dlpost = 0.0f;
  if (act) {
    mpre = mt[l16];
    mpost = mt[n + l16];
    const float dot = has_pre ? dots_in[(size_t)t * n + l16] : 0.0f;
    float s = sigmoid(mpre * a_pre + b[l16]);
    dlpre = (dh_pre[(size_t)t * n + l16] + dot) * (s * (1.0f - s));
    s = sigmoid(mpost * a_post + b[n + l16]);
    dlpost = dh_post[(size_t)t * n + l16] * (post_mult * s * (1.0f - s));
  }
  const float mres = elem ? mt[2 * n + l16] : 0.0f;
  const float L[1] = {elem ? mres * a_res + b[2 * n + l16] : 0.0f};
  float G = elem ? dh_res[(size_t)t * n * n + l16] : 0.0f;
  const dyn::SinkhornSmem sk{hist, n, tmax, tmax + 1};
  {
    float P[1];
    dyn::sinkhorn_forward_lanes_k<1>(L, P, n, tmax, sinkhorn_eps, lane, elem ? &sk : nullptr);
  }
  __syncwarp();  // the half-warp's row and column sums are in
  G = dyn::sinkhorn_backward_lanes(G, n, sk, sinkhorn_eps, lane);  // dlogits of h_res
  if (!elem) G = 0.0f;

  const float invr = invr_in[t];
  float* dzt = dz + (size_t)t * M;
  float* rt = rows + (size_t)t * (M + 3);
  if (valid) {
    if (act) {
      dzt[l16] = dlpre * a_pre * invr;
      rt[l16] = dlpre;
      dzt[n + l16] = dlpost * a_post * invr;
      rt[n + l16] = dlpost;
    }
    if (elem) {
      dzt[2 * n + l16] = G * a_res * invr;
      rt[2 * n + l16] = G;
    }
  }
  // sum(dl a mix) over the M entries, and sum(dl mix) over each segment (zeros from idle lanes)
  float gs = dlpre * a_pre * mpre + dlpost * a_post * mpost + G * a_res * mres;
  float sp = dlpre * mpre, so = dlpost * mpost, sr = G * mres;
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) {
    gs += __shfl_xor_sync(0xffffffffu, gs, o);
    sp += __shfl_xor_sync(0xffffffffu, sp, o);
    so += __shfl_xor_sync(0xffffffffu, so, o);
    sr += __shfl_xor_sync(0xffffffffu, sr, o);
  }
  if (valid && l16 == 0) {
    gs = gs / invr;
    factor[t] = (-gs * invr * invr * invr) / (float)(n * C);
    rt[M] = sp;
    rt[M + 1] = so;
    rt[M + 2] = sr;
  }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ mix, const float* __restrict__ invr_in,
    const float* __restrict__ b, const float* __restrict__ alpha_pre, const float* __restrict__ alpha_post,
    const float* __restrict__ alpha_res, const float* __restrict__ dh_pre,
    const float* __restrict__ dh_post, const float* __restrict__ dh_res, const T* __restrict__ dx_in,
    const float* __restrict__ dots, float* __restrict__ dz, float* __restrict__ factor, float* __restrict__ rows,
    int n, int C, int Tn, int tmax, float sinkhorn_eps, float post_mult, int has_pre, int has_dh_pre, int lanes,
    int slice) {
  extern __shared__ float smem[];
  const float a_pre = *alpha_pre, a_post = *alpha_post, a_res = *alpha_res;
  if (lanes == ELEMS) {
    const int lane = threadIdx.x % 32, t16 = (blockIdx.x * blockDim.x + threadIdx.x) / 16;
    if ((blockIdx.x * blockDim.x + threadIdx.x) / 32 * 2 >= Tn) return;  // both half-warps past the end
    token_coeffs_bwd_elems(smem + (size_t)(threadIdx.x / 16) * slice, min(t16, Tn - 1), t16 < Tn, lane, mix, invr_in, b,
                           a_pre, a_post, a_res, dh_pre, dh_post, dh_res, dots, dz, factor, rows, n, C, tmax,
                           sinkhorn_eps, post_mult, has_pre);
    return;
  }
  if (lanes) {
    const int t = (blockIdx.x * blockDim.x + threadIdx.x) / lanes;
    if (t < Tn)  // a whole group leaves together: its __syncwarp masks stay complete
      token_coeffs_bwd(dyn::LaneGroup(lanes), smem + (size_t)(threadIdx.x / lanes) * slice, t, x, mix, invr_in, b,
                       a_pre, a_post, a_res, dh_pre, dh_post, dh_res, dx_in, dots, dz, factor, rows, n, C, tmax,
                       sinkhorn_eps, post_mult, has_pre);
    return;
  }
  token_coeffs_bwd(dyn::CtaGroup{}, smem, (int)blockIdx.x, x, mix, invr_in, b, a_pre, a_post, a_res,
                   has_dh_pre ? dh_pre : nullptr, dh_post, dh_res, dx_in, dots, dz, factor, rows, n, C, tmax,
                   sinkhorn_eps, post_mult, has_pre);
}
