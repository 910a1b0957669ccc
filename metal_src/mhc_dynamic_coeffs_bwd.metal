// Backward of mhc_dynamic_coeffs, per token (LigerMHCCoeffsFunction.backward,
// src/liger_kernel/ops/mhc.py:1520-1593, with x_in's cotangent folded in):
//   dh_pre'   = dh_pre + (has_pre ? sum_c dx_in[c] x[j, c] : 0)     (LigerMHCPreFunction's grad_h)
//   dl_pre    = dh_pre' s (1 - s),  s = sigmoid(pre logits)                                (:1544)
//   dl_post   = dh_post post_mult s (1 - s)                                                  (:1551)
//   dl_res    = Sinkhorn backward of dh_res (recomputed forward with history)            (:536-584)
//   dmix      = alpha_seg dl;  dz = dmix invr;  factor = -(sum(dmix mix) / invr) invr^3 / K (:1559, :291-293)
// Mirrors cuda_src/mhc_dynamic_coeffs_bwd.cu in its mode 0 (a CTA per token, the stream dots computed
// here; `dots`, `lanes` and `slice` are read by the CUDA kernel's other modes alone), in the same
// operations and order. Outputs per token: dz [T, M] and factor [T] (the x and phi gradients, MLX
// matmuls in mhc_aot/metal_dynamic.py), rows [T, M + 3] = (dl, sum(dl_pre mix_pre), sum(dl_post
// mix_post), sum(dl_res mix_res)) whose column sums are db and dalpha.
// Inputs: x [T, n, C], mix [T, M], invr [T], b [M], alpha_pre, alpha_post, alpha_res (float32
// scalars), dh_pre [T, n], dh_post [T, n], dh_res [T, n, n], dx_in [T, C] (or any array if !has_pre),
// dots (unread). Launch: grid (T * THREADS, 1, 1), threadgroup (THREADS, 1, 1).
// Threadgroup memory (static): POOL floats laid out as the CUDA kernel's shared memory, 2 M + n n + n +
// NSIMD * max(NMAX, 1) + max(NMAX, 1) + (tmax + 1) n n + 2 tmax n of them used (the Sinkhorn history
// for the backward); the launcher sends a (n, tmax) whose need exceeds POOL to MLX's VJP.
#include "mhc_dynamic_common.h"

using namespace mhc;

constant constexpr int POOL = 7168;  // 28 KB
constant constexpr int NR = NMAX > 0 ? NMAX : 1;
constant constexpr int SCRATCH = NSIMD * NR + NR;

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
  int Tn;
  int tmax;
  float sinkhorn_eps;
  float post_mult;
  int has_pre;
  int has_dh_pre;  // 0: dh_pre is zero and not read (the layer discards h_pre: metal_dynamic.coeffs)
  int lanes;
  int slice;
};

// The Sinkhorn history: H(0) the row softmax (without eps), H(1 + t) the matrix after step t (H(1):
// after the first column normalisation), rs(t) / cs(t) the row / column sums of step t (before eps).
struct History {
  threadgroup float* base;
  int n;
  int tmax;
  threadgroup float* H(int s) const { return base + s * n * n; }
  threadgroup float* rs(int t) const { return base + (tmax + 1) * n * n + t * n; }
  threadgroup float* cs(int t) const { return base + (tmax + 1) * n * n + (tmax + t) * n; }
};

// Liger's Sinkhorn forward on logits L with its history (cuda_src/mhc_dynamic_common.cuh,
// sinkhorn_forward with keep_history).
inline void sinkhorn_forward(threadgroup const float* L, History h, float eps, uint tid) {
  const int n = h.n;
  threadgroup float* P = h.H(1);
  for (int i = int(tid); i < n; i += THREADS) {  // row softmax (max-subtracted), then + eps
    threadgroup const float* Li = L + i * n;
    float mx = Li[0];
    for (int j = 1; j < n; ++j) mx = max(mx, Li[j]);
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      const float e = precise::exp(Li[j] - mx);
      h.H(0)[i * n + j] = e;
      sum += e;
    }
    for (int j = 0; j < n; ++j) {
      const float p = h.H(0)[i * n + j] / sum;
      h.H(0)[i * n + j] = p;
      P[i * n + j] = p + eps;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int j = int(tid); j < n; j += THREADS) {  // first column normalisation
    float cs = 0.0f;
    for (int i = 0; i < n; ++i) cs += P[i * n + j];
    h.cs(0)[j] = cs;
    for (int i = 0; i < n; ++i) P[i * n + j] = P[i * n + j] / (cs + eps);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int t = 1; t < h.tmax; ++t) {
    threadgroup const float* src = h.H(t);
    threadgroup float* dst = h.H(1 + t);
    for (int i = int(tid); i < n; i += THREADS) {
      float rs = 0.0f;
      for (int j = 0; j < n; ++j) rs += src[i * n + j];
      h.rs(t)[i] = rs;
      for (int j = 0; j < n; ++j) dst[i * n + j] = src[i * n + j] / (rs + eps);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = int(tid); j < n; j += THREADS) {
      float cs = 0.0f;
      for (int i = 0; i < n; ++i) cs += dst[i * n + j];
      h.cs(t)[j] = cs;
      for (int i = 0; i < n; ++i) dst[i * n + j] = dst[i * n + j] / (cs + eps);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// G (n n, the cotangent of h_res) <- the cotangent of the logits (sinkhorn_backward there).
inline void sinkhorn_backward(threadgroup float* G, History h, float eps, uint tid) {
  const int n = h.n;
  for (int t = h.tmax - 1; t >= 1; --t) {
    threadgroup const float* mat = h.H(1 + t);
    threadgroup const float* cst = h.cs(t);
    for (int j = int(tid); j < n; j += THREADS) {  // undo the column normalisation of step t
      const float denom = cst[j] + eps;
      float dot = 0.0f;
      for (int i = 0; i < n; ++i) dot += G[i * n + j] * mat[i * n + j];
      for (int i = 0; i < n; ++i) G[i * n + j] = (G[i * n + j] - dot) / denom;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = int(tid); i < n; i += THREADS) {  // undo the row normalisation of step t
      float dot = 0.0f;
      for (int j = 0; j < n; ++j) dot += G[i * n + j] * (mat[i * n + j] * (cst[j] + eps));
      const float denom = h.rs(t)[i] + eps;
      for (int j = 0; j < n; ++j) G[i * n + j] = (G[i * n + j] - dot) / denom;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  threadgroup const float* mat0 = h.H(1);
  for (int j = int(tid); j < n; j += THREADS) {  // the first column normalisation
    const float denom = h.cs(0)[j] + eps;
    float dot = 0.0f;
    for (int i = 0; i < n; ++i) dot += G[i * n + j] * mat0[i * n + j];
    for (int i = 0; i < n; ++i) G[i * n + j] = (G[i * n + j] - dot) / denom;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  threadgroup const float* p = h.H(0);
  for (int i = int(tid); i < n; i += THREADS) {  // the row softmax
    float dot = 0.0f;
    for (int j = 0; j < n; ++j) dot += G[i * n + j] * p[i * n + j];
    for (int j = 0; j < n; ++j) G[i * n + j] = p[i * n + j] * (G[i * n + j] - dot);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const float* mix [[buffer(1)]],
                      device const float* invr_in [[buffer(2)]], device const float* b [[buffer(3)]],
                      device const float* alpha_pre [[buffer(4)]], device const float* alpha_post [[buffer(5)]],
                      device const float* alpha_res [[buffer(6)]], device const float* dh_pre [[buffer(7)]],
                      device const float* dh_post [[buffer(8)]], device const float* dh_res [[buffer(9)]],
                      device const T* dx_in [[buffer(10)]], device const float* dots [[buffer(11)]],
                      constant Scalars& s [[buffer(12)]], device float* dz [[buffer(13)]],
                      device float* factor [[buffer(14)]], device float* rows [[buffer(15)]],
                      uint tid [[thread_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]], uint3 tgid [[threadgroup_position_in_grid]]) {
  threadgroup float pool[POOL];
  const Tid tt{tid, lane, sg};
  const int n = s.n, C = s.C, M = n * n + 2 * n, t = int(tgid.x);
  const float eps = s.sinkhorn_eps;
  const float a_pre = alpha_pre[0], a_post = alpha_post[0], a_res = alpha_res[0];
  threadgroup float* mixs = pool;        // M
  threadgroup float* dl = mixs + M;      // M
  threadgroup float* L = dl + M;         // n n logits
  threadgroup float* dts = L + n * n;    // n: the stream dots
  threadgroup float* scratch = dts + n;  // SCRATCH
  const History h{scratch + SCRATCH, n, s.tmax};

  for (int m = int(tid); m < M; m += THREADS) mixs[m] = mix[size_t(t) * M + m];
  for (int j = int(tid); j < n; j += THREADS) dts[j] = 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (s.has_pre) stream_dots<NMAX>(x + size_t(t) * n * C, dx_in + size_t(t) * C, n, C, scratch, dts, tt);
  for (int j = int(tid); j < n; j += THREADS) {
    float sg_ = sigmoid(mixs[j] * a_pre + b[j]);
    dl[j] = ((s.has_dh_pre ? dh_pre[size_t(t) * n + j] : 0.0f) + dts[j]) * (sg_ * (1.0f - sg_));
    sg_ = sigmoid(mixs[n + j] * a_post + b[n + j]);
    dl[n + j] = dh_post[size_t(t) * n + j] * (s.post_mult * sg_ * (1.0f - sg_));
  }
  threadgroup float* Gm = dl + 2 * n;
  for (int e = int(tid); e < n * n; e += THREADS) {
    L[e] = mixs[2 * n + e] * a_res + b[2 * n + e];
    Gm[e] = dh_res[size_t(t) * n * n + e];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  sinkhorn_forward(L, h, eps, tid);
  sinkhorn_backward(Gm, h, eps, tid);  // dl[2n:] = dlogits of h_res

  const float invr = invr_in[t];
  for (int m = int(tid); m < M; m += THREADS) {
    const float a = m < n ? a_pre : m < 2 * n ? a_post : a_res;
    dz[size_t(t) * M + m] = dl[m] * a * invr;
    rows[size_t(t) * (M + 3) + m] = dl[m];
  }
  if (tid == 0) {  // serial sums in a fixed order: deterministic
    float gs = 0.0f, sp = 0.0f, so = 0.0f, sr = 0.0f;
    for (int m = 0; m < M; ++m) {
      const float a = m < n ? a_pre : m < 2 * n ? a_post : a_res;
      gs += dl[m] * a * mixs[m];
      const float dm = dl[m] * mixs[m];
      if (m < n) {
        sp += dm;
      } else if (m < 2 * n) {
        so += dm;
      } else {
        sr += dm;
      }
    }
    gs = gs / invr;
    factor[t] = (-gs * invr * invr * invr) / float(n * C);
    rows[size_t(t) * (M + 3) + M] = sp;
    rows[size_t(t) * (M + 3) + M + 1] = so;
    rows[size_t(t) * (M + 3) + M + 2] = sr;
  }
}
