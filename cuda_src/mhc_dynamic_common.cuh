// Shared by the dynamic-mHC kernels (cuda_src/mhc_dynamic_*.cu): block reductions of several
// values at once, the per-token stream dot products, and Liger-Kernel's per-token Sinkhorn
// (src/liger_kernel/ops/mhc.py:471-490 forward, :536-584 backward) on an n x n matrix in shared
// memory. Built on mhc_common.cuh (element types, 16-byte vector I/O, THREADS, for_streams).
//
// Conventions as every mhc-aot kernel: float32 math, x / f / their gradients in MHC_DTYPE,
// coefficients and parameters float32; one CTA of mhc::THREADS threads.
#pragma once

#include "mhc_common.cuh"

namespace mhc {
namespace dyn {

constexpr int WARPS = THREADS / 32;

// f(phi as a pointer to its own dtype) (phi_kind, cuda_dynamic.PHI_KINDS: 0 float32, 1 bfloat16, 2
// float16): the kernels that read phi once read it as it is, so no float32 copy (a launch) comes before them
template <typename F>
__device__ __forceinline__ auto with_phi(const void* phi, int phi_kind, F&& f) {
  if (phi_kind == 1) return f(static_cast<const bf16*>(phi));
  if (phi_kind == 2) return f(static_cast<const f16*>(phi));
  return f(static_cast<const float*>(phi));
}
// phi[i] as a float
__device__ __forceinline__ float phi_at(const void* phi, int phi_kind, size_t i) {
  return with_phi(phi, phi_kind, [&](const auto* p) { return to_float(p[i]); });
}

// consts[e] for e < 3 + M: [alpha_pre, alpha_post, alpha_res, b[0..M)], an ordinary device array that the
// coefficient kernels and the backward read instead of the alphas' own arrays (mhc_dynamic_phi_split's
// header says why); written by threads e of one CTA of phi_split or mhc_dynamic_coeffs_pre
__device__ __forceinline__ void write_consts(float* __restrict__ consts, int e, int M,
                                             const float* __restrict__ alpha_pre, const float* __restrict__ alpha_post,
                                             const float* __restrict__ alpha_res, const float* __restrict__ b) {
  if (e < 3 + M) consts[e] = e == 0 ? *alpha_pre : e == 1 ? *alpha_post : e == 2 ? *alpha_res : b[e - 3];
}

// Sums R values over the CTA: out[q] (shared, R floats) = sum over threads of v[q]. `scratch`
// holds WARPS * R floats. Starts and ends synchronised; every thread must call it.
template <int R>
__device__ __forceinline__ void block_sum_n(float (&v)[R], float* scratch, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < R; ++q) v[q] = warp_sum(v[q]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < R; ++q) scratch[warp * R + q] = v[q];
  }
  __syncthreads();
  for (int q = threadIdx.x; q < R; q += THREADS) {
    float s = 0.0f;
    for (int w = 0; w < WARPS; ++w) s += scratch[w * R + q];
    out[q] = s;
  }
  __syncthreads();
}

// dots[j] = sum_c g[c] * x[j, c] for j < n, one token: x [n, C], g [C] (both E, row-major).
// Compile-time NM >= n: one pass over the token with NM accumulators per thread; NM = 0: one
// block reduction per stream (x re-read per stream from cache). `scratch`: WARPS * max(NM, 1)
// floats. Result in shared `dots` (n floats). Every thread must call it.
template <int NM, typename E>
__device__ __forceinline__ void stream_dots(const E* __restrict__ x, const E* __restrict__ g, int n, int C,
                                            float* scratch, float* dots) {
  constexpr int V = Vec<E>::N;
  const bool vec = vec_ok<E>(C, x, g);
  if constexpr (NM > 0) {
    float acc[NM];
#pragma unroll
    for (int j = 0; j < NM; ++j) acc[j] = 0.0f;
    if (vec) {
      for (int v = threadIdx.x; v < C / V; v += THREADS) {
        float gv[V];
        load_vec(g + v * V, gv);
#pragma unroll
        for (int j = 0; j < NM; ++j) {
          if (j < n) {
            float xv[V];
            load_vec(x + (size_t)j * C + v * V, xv);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[j] += gv[e] * xv[e];
          }
        }
      }
    } else {
      for (int c = threadIdx.x; c < C; c += THREADS) {
        const float gc = to_float(g[c]);
#pragma unroll
        for (int j = 0; j < NM; ++j)
          if (j < n) acc[j] += gc * to_float(x[(size_t)j * C + c]);
      }
    }
    block_sum_n<NM>(acc, scratch, scratch + WARPS * NM);
    for (int j = threadIdx.x; j < n; j += THREADS) dots[j] = scratch[WARPS * NM + j];
    __syncthreads();
  } else {
    for (int j = 0; j < n; ++j) {
      float acc[1] = {0.0f};
      const E* xj = x + (size_t)j * C;
      if (vec) {
        for (int v = threadIdx.x; v < C / V; v += THREADS) {
          float gv[V], xv[V];
          load_vec(g + v * V, gv);
          load_vec(xj + v * V, xv);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[0] += gv[e] * xv[e];
        }
      } else {
        for (int c = threadIdx.x; c < C; c += THREADS) acc[0] += to_float(g[c]) * to_float(xj[c]);
      }
      block_sum_n<1>(acc, scratch, scratch + WARPS);
      if (threadIdx.x == 0) dots[j] = scratch[WARPS];
      __syncthreads();
    }
  }
}

// x_in[c] = sum_j h[j] x[j, c] for one token (h in shared memory), stored as E. Liger's order:
// acc starts at 0 and adds stream 0, 1, ... (ops/mhc.py:878-890).
template <int NM, typename E>
__device__ __forceinline__ void aggregate_token(const E* __restrict__ x, const float* h, E* __restrict__ out,
                                                int n, int C, int c_begin, int c_step) {
  constexpr int V = Vec<E>::N;
  if (vec_ok<E>(C, x, out)) {
    for (int v = c_begin; v < C / V; v += c_step) {
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.0f;
      for_streams<NM>(n, [&](int j) {
        float xv[V];
        load_vec(x + (size_t)j * C + v * V, xv);
        const float hj = h[j];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += xv[e] * hj;
      });
      store_vec(out + v * V, acc);
    }
  } else {
    for (int c = c_begin; c < C; c += c_step) {
      float acc = 0.0f;
      for_streams<0>(n, [&](int j) { acc += to_float(x[(size_t)j * C + c]) * h[j]; });
      out[c] = from_float<E>(acc);
    }
  }
}

// v = hi + mid + lo, three bfloat16 terms exact to 2^-24 relative: the float32 operand of the
// tensor-core kernels (mhc_dynamic_proj_tc, mhc_dynamic_dphi_tc), whose three bfloat16 MMAs with
// float32 accumulation then give a float32-accurate product.
__device__ __forceinline__ void split_bf16x3(float v, bf16& hi, bf16& mid, bf16& lo) {
  hi = from_float<bf16>(v);
  const float r1 = v - to_float(hi);
  mid = from_float<bf16>(r1);
  lo = from_float<bf16>(r1 - to_float(mid));
}

// ---------------------------------------------------------------- Liger's Sinkhorn, per token
// Every division of the Sinkhorn (forward and backward) is div.full.f32, as in Liger: Triton lowers
// a float32 `/` to it (an approximation within 2 ulp, no slow path). The IEEE `/` that stood here
// put a branchy division on each step of the per-token serial chain (ncu, H100, T = 8192, n = 4:
// a thread per token, the register mode then, still took 49 us forward, 95 us backward).
__device__ __forceinline__ float sk_div(float a, float b) {
#ifdef MHC_EMULATED
  return a / b;
#else
  float d;
  asm("div.full.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#endif
}
// Shared-memory layout of one token's Sinkhorn (sinkhorn_floats(n, tmax, slots) floats):
//   H(0) = softmax p, H(1 + t) = mat_t for t = 0 .. slots-2   (slots n n floats: tmax + 1 slots
//   keep the whole history for the backward, 2 slots are enough for the forward)
//   rs[t][i] for t = 1 .. tmax-1, cs[t][j] for t = 0 .. tmax-1  (2 tmax n floats)
// Rows are processed by thread i < n, columns by thread j < n: every phase is one thread per
// row or column doing the serial sums in Liger's order, then one __syncthreads.
__host__ __device__ constexpr int sinkhorn_floats(int n, int tmax, int slots) { return slots * n * n + 2 * tmax * n; }

// Who runs one token's per-token math (activations, Sinkhorn). CtaGroup: the whole CTA, rows and
// columns spread over its threads with a barrier between phases (any n). LaneGroup: `size` lanes of
// one warp (a power of two >= n, so groups never straddle warps) on their own token, synchronised by
// __syncwarp over the group's mask: many tokens per CTA, so the per-token math stops holding a CTA -
// and the x traffic behind it - for ~40 barrier phases. Both sum in the same serial order (one
// thread per row or column), so they give identical results.
struct CtaGroup {
  static constexpr bool cta = true;
  static constexpr int size = THREADS;
  int rank;
  __device__ CtaGroup() : rank(threadIdx.x) {}
  __device__ void sync() const { __syncthreads(); }
};
struct LaneGroup {
  static constexpr bool cta = false;
  int rank, size;
  unsigned mask;
  __device__ explicit LaneGroup(int lanes)
      : rank(threadIdx.x % lanes), size(lanes),
        mask((lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u) << ((threadIdx.x % 32) / lanes * lanes)) {}
  __device__ void sync() const { __syncwarp(mask); }
};

struct SinkhornSmem {
  float* base;
  int n, tmax, slots;
  __device__ float* H(int s) const { return base + (size_t)s * n * n; }
  __device__ float* rs(int t) const { return base + (size_t)slots * n * n + (size_t)t * n; }
  __device__ float* cs(int t) const { return base + (size_t)slots * n * n + (size_t)(tmax + t) * n; }
};

// Forward on logits L (shared, n n floats, read only). With `keep_history` false (2 slots) only
// H(0) and H(1) are used (H(1) is updated in place) and the result is in H(1); with it, mat_t is kept in
// H(1 + t) and the result is in H(tmax). Returns the slot holding the result.
template <class G = CtaGroup>
__device__ __forceinline__ float* sinkhorn_forward(const float* L, SinkhornSmem s, float eps, bool keep_history,
                                                  G g = G()) {
  const int n = s.n;
  float* P = s.H(1);
  for (int i = g.rank; i < n; i += g.size) {  // row softmax (max-subtracted), then + eps
    const float* Li = L + i * n;
    float mx = Li[0];
    for (int j = 1; j < n; ++j) mx = fmaxf(mx, Li[j]);
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      const float e = expf(Li[j] - mx);
      s.H(0)[i * n + j] = e;
      sum += e;
    }
    for (int j = 0; j < n; ++j) {
      const float p = sk_div(s.H(0)[i * n + j], sum);
      s.H(0)[i * n + j] = p;
      P[i * n + j] = p + eps;
    }
  }
  g.sync();
  for (int j = g.rank; j < n; j += g.size) {  // first column normalisation
    float cs = 0.0f;
    for (int i = 0; i < n; ++i) cs += P[i * n + j];
    s.cs(0)[j] = cs;
    for (int i = 0; i < n; ++i) P[i * n + j] = sk_div(P[i * n + j], cs + eps);
  }
  g.sync();
  for (int t = 1; t < s.tmax; ++t) {
    const float* src = P;
    float* dst = keep_history ? s.H(1 + t) : P;
    for (int i = g.rank; i < n; i += g.size) {
      float rs = 0.0f;
      for (int j = 0; j < n; ++j) rs += src[i * n + j];
      s.rs(t)[i] = rs;
      for (int j = 0; j < n; ++j) dst[i * n + j] = sk_div(src[i * n + j], rs + eps);
    }
    g.sync();
    for (int j = g.rank; j < n; j += g.size) {
      float cs = 0.0f;
      for (int i = 0; i < n; ++i) cs += dst[i * n + j];
      s.cs(t)[j] = cs;
      for (int i = 0; i < n; ++i) dst[i * n + j] = sk_div(dst[i * n + j], cs + eps);
    }
    g.sync();
    P = dst;
  }
  return P;
}

// Backward (after sinkhorn_forward with keep_history): G (shared, n n) holds dL/dh_res on entry
// and dL/dlogits on exit; needs tmax + 1 slots. _mhc_sinkhorn_bwd_kernel's formulas, ops/mhc.py:551-584.
template <class Grp = CtaGroup>
__device__ __forceinline__ void sinkhorn_backward(float* G, SinkhornSmem s, float eps, Grp g = Grp()) {
  const int n = s.n;
  for (int t = s.tmax - 1; t >= 1; --t) {
    const float* mat = s.H(1 + t);
    const float* cst = s.cs(t);
    for (int j = g.rank; j < n; j += g.size) {  // undo the column normalisation of step t
      const float denom = cst[j] + eps;
      float dot = 0.0f;
      for (int i = 0; i < n; ++i) dot += G[i * n + j] * mat[i * n + j];
      for (int i = 0; i < n; ++i) G[i * n + j] = sk_div(G[i * n + j] - dot, denom);
    }
    g.sync();
    for (int i = g.rank; i < n; i += g.size) {  // undo the row normalisation of step t
      float dot = 0.0f;
      for (int j = 0; j < n; ++j) dot += G[i * n + j] * (mat[i * n + j] * (cst[j] + eps));
      const float denom = s.rs(t)[i] + eps;
      for (int j = 0; j < n; ++j) G[i * n + j] = sk_div(G[i * n + j] - dot, denom);
    }
    g.sync();
  }
  const float* mat0 = s.H(1);
  for (int j = g.rank; j < n; j += g.size) {  // the first column normalisation
    const float denom = s.cs(0)[j] + eps;
    float dot = 0.0f;
    for (int i = 0; i < n; ++i) dot += G[i * n + j] * mat0[i * n + j];
    for (int i = 0; i < n; ++i) G[i * n + j] = sk_div(G[i * n + j] - dot, denom);
  }
  g.sync();
  const float* p = s.H(0);
  for (int i = g.rank; i < n; i += g.size) {  // the row softmax
    float dot = 0.0f;
    for (int j = 0; j < n; ++j) dot += G[i * n + j] * p[i * n + j];
    for (int j = 0; j < n; ++j) G[i * n + j] = p[i * n + j] * (G[i * n + j] - dot);
  }
  g.sync();
}

// ---------------------------------------------------------------- the same Sinkhorn, a lane per element
// A half-warp per token for n <= LANE_N: lane l16 = lane % 16 holds element (l16 / n, l16 % n) of the
// logits L and returns that element of h_res (lanes >= n n carry values nobody reads). A row's or a
// column's n values are gathered by independent shuffles issued back to back and folded in index
// order: each element's operations and their order are those of sinkhorn_forward's, so the same
// results. Every lane of the warp calls it (full-mask shuffles). The chain a token waits on is ~2 tmax
// short shuffle-and-divide phases spread over 16 threads, so 16x the warps of a thread per token (the
// register mode until session 33) hide each other's latency.
constexpr int LANE_N = 4;

// K tokens a lane (K independent chains interleaved: a latency-bound chain issues K times the work in
// about the same time; the one-read kernel batches its tokens' h_res so). Each token's operations and
// their order are those of K = 1. `hist` (K = 1, the backward's recompute, null elsewhere): the history
// in SinkhornSmem's layout (n n per slot): each lane its element of H(0) .. H(tmax), the lanes of column
// 0 the row sums rs(t), the lanes of row 0 the column sums cs(t); pass it only for lanes l16 < n n.
template <int K>
__device__ __forceinline__ void sinkhorn_forward_lanes_k(const float (&L)[K], float (&P)[K], int n, int tmax, float eps,
                                                         int lane, const SinkhornSmem* hist = nullptr) {
  const int l16 = lane % 16, ii = l16 / n, jj = l16 % n;
  // out[u] = op-fold of the n values of val[u]'s row (or column) through this lane, in index order
  auto fold = [&](const float (&val)[K], bool row, auto op, float (&out)[K]) {
    float got[K][LANE_N];
#pragma unroll
    for (int k = 0; k < LANE_N; ++k)
#pragma unroll
      for (int u = 0; u < K; ++u)
        got[u][k] = __shfl_sync(0xffffffffu, val[u], row ? ii * n + min(k, n - 1) : min(k, n - 1) * n + jj, 16);
#pragma unroll
    for (int u = 0; u < K; ++u) {
      float r = got[u][0];
#pragma unroll
      for (int k = 1; k < LANE_N; ++k)
        if (k < n) r = op(r, got[u][k]);
      out[u] = r;
    }
  };
  auto add = [](float a, float c) { return a + c; };
  float f[K], ex[K];
  fold(L, true, [](float a, float c) { return fmaxf(a, c); }, f);
#pragma unroll
  for (int u = 0; u < K; ++u) ex[u] = expf(L[u] - f[u]);
  fold(ex, true, add, f);
  const int l16n = ii * n + jj;  // this lane's slot in a history matrix
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const float p = sk_div(ex[u], f[u]);  // row softmax, then + eps
    if (K == 1 && hist) hist->H(0)[l16n] = p;
    P[u] = p + eps;
  }
  fold(P, false, add, f);
  if (K == 1 && hist && ii == 0) hist->cs(0)[jj] = f[0];
#pragma unroll
  for (int u = 0; u < K; ++u) P[u] = sk_div(P[u], f[u] + eps);   // first column normalisation
  if (K == 1 && hist) hist->H(1)[l16n] = P[0];
#pragma unroll 1
  for (int it = 1; it < tmax; ++it) {
    fold(P, true, add, f);
    if (K == 1 && hist && jj == 0) hist->rs(it)[ii] = f[0];
#pragma unroll
    for (int u = 0; u < K; ++u) P[u] = sk_div(P[u], f[u] + eps);
    fold(P, false, add, f);
    if (K == 1 && hist && ii == 0) hist->cs(it)[jj] = f[0];
#pragma unroll
    for (int u = 0; u < K; ++u) P[u] = sk_div(P[u], f[u] + eps);
    if (K == 1 && hist) hist->H(1 + it)[l16n] = P[0];
  }
}

// The backward of sinkhorn_forward_lanes_k<1> with `hist` (the half-warp's history, complete: a
// __syncwarp after the forward), a lane per element: g = dL/dh_res of this lane's element on entry,
// dL/dlogits on exit. The steps of sinkhorn_backward; each dot product of a row or column is the n
// lane products gathered by shuffles and added in index order (a product, then an add: a contracted
// multiply-add chain may round differently). Every lane of the warp calls it.
__device__ __forceinline__ float sinkhorn_backward_lanes(float g, int n, const SinkhornSmem& s, float eps, int lane) {
  // lanes l16 >= n n stand in for element 0 (their results are never read): their history reads stay in
  // the token's slice
  const int l16 = lane % 16, at = l16 < n * n ? l16 : 0, ii = at / n, jj = at % n;
  auto dot = [&](float v, bool row) {  // sum of v over this lane's row (or column), in index order
    float got[LANE_N];
#pragma unroll
    for (int k = 0; k < LANE_N; ++k)
      got[k] = __shfl_sync(0xffffffffu, v, row ? ii * n + min(k, n - 1) : min(k, n - 1) * n + jj, 16);
    float r = got[0];
#pragma unroll
    for (int k = 1; k < LANE_N; ++k)
      if (k < n) r += got[k];
    return r;
  };
#pragma unroll 1
  for (int t = s.tmax - 1; t >= 1; --t) {
    const float mat = s.H(1 + t)[at], cst = s.cs(t)[jj] + eps;
    g = sk_div(g - dot(g * mat, false), cst);                  // step t's column normalisation
    g = sk_div(g - dot(g * (mat * cst), true), s.rs(t)[ii] + eps);  // then its rows
  }
  g = sk_div(g - dot(g * s.H(1)[at], false), s.cs(0)[jj] + eps);  // the first column normalisation
  const float p = s.H(0)[at];
  return p * (g - dot(g * p, true));  // the row softmax
}

__device__ __forceinline__ float sinkhorn_forward_lanes(float L, int n, int tmax, float eps, int lane) {
  const float l[1] = {L};
  float p[1];
  sinkhorn_forward_lanes_k<1>(l, p, n, tmax, eps, lane);
  return p[0];
}

// x_in of the one-read kernels (mhc_dynamic_coeffs_pre, mhc_dynamic_proj_cluster): xa[v] += x[v] h for
// the eight bfloat16 of one 16-byte piece of a stream, in float32 (mhc_dynamic_pre's order: call it for
// streams 0, 1, ...), then the eight sums stored once rounded at columns c .. c + 7 of a row of C: one
// 16-byte store where the row allows (vec: x_in 16-byte aligned), else element stores up to C.
__device__ __forceinline__ void fma8_bf16(float (&xa)[8], const uint4& w, float h) {
  const bf16* xv = reinterpret_cast<const bf16*>(&w);
#pragma unroll
  for (int v = 0; v < 8; ++v) xa[v] += to_float(xv[v]) * h;
}
__device__ __forceinline__ void store8_bf16(bf16* out, const float (&xa)[8], int c, int C, bool vec) {
  if (vec && c + 8 <= C) {
    store_vec(out, xa);
  } else {
#pragma unroll
    for (int v = 0; v < 8; ++v)
      if (c + v < C) out[v] = from_float<bf16>(xa[v]);
  }
}

}  // namespace dyn
}  // namespace mhc
