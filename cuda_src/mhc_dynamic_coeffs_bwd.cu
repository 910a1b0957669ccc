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
// Two modes (`lanes`), as mhc_dynamic_coeffs:
//   0: one CTA per token, the stream dots sum_c dx_in[c] x[j, c] computed here.
//      Grid (threads): (T * THREADS, 1, 1), block THREADS. Shared memory: 2 M + n n + n +
//      sinkhorn_floats(n, tmax, tmax + 1) + WARPS * max(NMAX, 1) + max(NMAX, 1) floats.
//   lanes (a power of two >= n, <= 32): a lane group per token (dyn::LaneGroup); the dots come
//      precomputed in `dots` (mhc_dynamic_pre_bwd without dx, a pure stream over x); each group its
//      own `slice` (odd) of shared memory: 2 M + n n + n + sinkhorn_floats(n, tmax, tmax + 1)
//      floats. Grid (threads): (ceil(T lanes / blockDim) * blockDim, 1, 1); shared memory:
//      blockDim / lanes * slice floats.
//   lanes < 0: the register mode (variants with 0 < NMAX <= dyn::REG_N, n <= NMAX): a thread per
//      token, its matrices in registers, only the Sinkhorn history in its `slice` (odd) of shared
//      memory: sinkhorn_floats(NMAX, tmax, tmax + 1) floats, laid out for n = NMAX. Grid (threads):
//      (ceil(T / blockDim) * blockDim, 1, 1); shared memory: blockDim * slice floats.
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
    dl[j] = (dh_pre[(size_t)t * n + j] + dots[j]) * (s * (1.0f - s));
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

// Token t's backward by one thread (n <= N = NMAX <= dyn::REG_N): the values of token_coeffs_bwd
// in lane mode, the same operations in the same order; `hist` is this thread's shared slice.
template <int N>
__device__ __forceinline__ void token_coeffs_bwd_regs(
    float* hist, int t, const float* __restrict__ mix, const float* __restrict__ invr_in, const float* __restrict__ b,
    float a_pre, float a_post, float a_res, const float* __restrict__ dh_pre, const float* __restrict__ dh_post,
    const float* __restrict__ dh_res, const float* __restrict__ dots_in, float* __restrict__ dz,
    float* __restrict__ factor, float* __restrict__ rows, int n, int C, int tmax, float sinkhorn_eps,
    float post_mult, int has_pre) {
  const int M = n * n + 2 * n;
  const float* mt = mix + (size_t)t * M;
  float mpre[N], mpost[N], mres[N][N], dlpre[N], dlpost[N], L[N][N], G[N][N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i >= n) continue;
    mpre[i] = mt[i];
    mpost[i] = mt[n + i];
    const float dot = has_pre ? dots_in[(size_t)t * n + i] : 0.0f;
    float s = sigmoid(mpre[i] * a_pre + b[i]);
    dlpre[i] = (dh_pre[(size_t)t * n + i] + dot) * (s * (1.0f - s));
    s = sigmoid(mpost[i] * a_post + b[n + i]);
    dlpost[i] = dh_post[(size_t)t * n + i] * (post_mult * s * (1.0f - s));
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (j >= n) continue;
      mres[i][j] = mt[2 * n + i * n + j];
      L[i][j] = mres[i][j] * a_res + b[2 * n + i * n + j];
      G[i][j] = dh_res[(size_t)t * n * n + i * n + j];
    }
  }
  const dyn::SinkhornSmem sk{hist, N, tmax, tmax + 1};
  {
    float P[N][N];
    dyn::sinkhorn_forward_regs<N>(L, P, n, tmax, sinkhorn_eps, &sk);
  }
  dyn::sinkhorn_backward_regs<N>(G, n, sk, sinkhorn_eps);  // G = dlogits of h_res

  const float invr = invr_in[t];
  float* dzt = dz + (size_t)t * M;
  float* rt = rows + (size_t)t * (M + 3);
  float gs = 0.0f, sp = 0.0f, so = 0.0f, sr = 0.0f;  // serial sums in token_coeffs_bwd's order
  auto put = [&](int m, float dl, float a, float mv, float& seg) {  // entry m of the M coefficients
    dzt[m] = dl * a * invr;
    rt[m] = dl;
    gs += dl * a * mv;
    seg += dl * mv;
  };
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < n) put(i, dlpre[i], a_pre, mpre[i], sp);
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < n) put(n + i, dlpost[i], a_post, mpost[i], so);
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (i < n && j < n) put(2 * n + i * n + j, G[i][j], a_res, mres[i][j], sr);
  gs = gs / invr;
  factor[t] = (-gs * invr * invr * invr) / (float)(n * C);
  rt[M] = sp;
  rt[M + 1] = so;
  rt[M + 2] = sr;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ mix, const float* __restrict__ invr_in,
    const float* __restrict__ b, const float* __restrict__ alpha_pre, const float* __restrict__ alpha_post,
    const float* __restrict__ alpha_res, const float* __restrict__ dh_pre,
    const float* __restrict__ dh_post, const float* __restrict__ dh_res, const T* __restrict__ dx_in,
    const float* __restrict__ dots, float* __restrict__ dz, float* __restrict__ factor, float* __restrict__ rows,
    int n, int C, int Tn, int tmax, float sinkhorn_eps, float post_mult, int has_pre, int lanes, int slice) {
  extern __shared__ float smem[];
  const float a_pre = *alpha_pre, a_post = *alpha_post, a_res = *alpha_res;
  if (lanes < 0) {  // the register mode: passed only to variants with 0 < NMAX <= dyn::REG_N
    if constexpr (NMAX > 0 && NMAX <= dyn::REG_N) {
      const int t = blockIdx.x * blockDim.x + threadIdx.x;
      if (t < Tn)
        token_coeffs_bwd_regs<NMAX>(smem + (size_t)threadIdx.x * slice, t, mix, invr_in, b, a_pre, a_post, a_res, dh_pre,
                                    dh_post, dh_res, dots, dz, factor, rows, n, C, tmax, sinkhorn_eps, post_mult,
                                    has_pre);
      return;
    }
  }
  if (lanes) {
    const int t = (blockIdx.x * blockDim.x + threadIdx.x) / lanes;
    if (t < Tn)  // a whole group leaves together: its __syncwarp masks stay complete
      token_coeffs_bwd(dyn::LaneGroup(lanes), smem + (size_t)(threadIdx.x / lanes) * slice, t, x, mix, invr_in, b,
                       a_pre, a_post, a_res, dh_pre, dh_post, dh_res, dx_in, dots, dz, factor, rows, n, C, tmax,
                       sinkhorn_eps, post_mult, has_pre);
    return;
  }
  token_coeffs_bwd(dyn::CtaGroup{}, smem, (int)blockIdx.x, x, mix, invr_in, b, a_pre, a_post, a_res, dh_pre,
                   dh_post, dh_res, dx_in, dots, dz, factor, rows, n, C, tmax, sinkhorn_eps, post_mult, has_pre);
}
