// Static mHC backward, strategy `fused`: dx for each token plus per-threadgroup partial sums of
// the parameter gradients, reduced over threadgroups afterwards by mhc_backward_reduce (no
// atomics, deterministic). With y = agg * r * w, g = dy * w and dout = dL/dout:
//   dy[c]      = sum_i H_post[i] dout[i, c]
//   dagg[c]    = r g[c] - r^3 agg[c] (sum_c' g[c'] agg[c']) / C          (RMSNorm backward)
//   dx[j, c]   = sum_i M[i, j] dout[i, c] + H_pre[j] dagg[c]
//   dH_post[i] = sum dout[i, c] y[c];  dH_pre[j] = sum dagg[c] x[j, c];  dw[c] = sum dy[c] agg[c] r
//   dM[i, j]   = sum dout[i, c] x[j, c]   (here only when NMAX <= 4: n^2 registers per thread;
//                                          larger n use mhc_backward_dm)
// Threadgroup g walks tokens g, g + G, ... Pass A reads x and dout (agg, dy, dH_post, dw, the
// RMS dot); pass B re-reads them from cache and writes dx.
// partial[g] = [dM (n*n) | dH_pre (n) | dH_post (n) | dw (C)], activations' derivatives not applied.
// Mirrors cuda_src/mhc_backward_fused.cu, with what Metal's 32 KB of static threadgroup memory
// forces: agg and g are recomputed in pass B (not kept as C floats in shared memory), and dw
// accumulates in this threadgroup's own row of `partial` (each column owned by one thread).
// Reductions are fixed-order, without atomics, as there: per-thread dH_pre slots, per-simdgroup
// dH_post and dM slots. Serves n <= NCAP (the launcher's rule; n > DM_N_LIMIT never
// gets here: its dM needs mhc_backward_dm, which stops there).
// Launch: grid (G * THREADS, 1, 1), threadgroup (THREADS, 1, 1).
#include "mhc_token_passes.h"

using namespace mhc;

constant constexpr bool DM_IN_REGISTERS = NMAX > 0 && NMAX <= 4;  // n^2 <= 16 accumulators; more would spill
constant constexpr int DM_SLOTS = DM_IN_REGISTERS ? NMAX * NMAX : 1;
static_assert((NMAX > 0 ? NMAX * PADCAP : 0) + 2 * PADCAP + NSIMD + NSIMD * DM_SLOTS + THREADS * IB + NSIMD * PADCAP <= TG_FLOATS_MAX,
              "threadgroup memory over 32 KB");

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
  int B;
};

// Threadgroup arrays of the kernel, and the per-simdgroup accumulator slots.
struct Smem {
  threadgroup const float* hpre;
  threadgroup const float* hpost;
  threadgroup float* scratch;
  threadgroup float* sg_dM;         // [NSIMD][DM_SLOTS]: per-simdgroup dM (NMAX <= 4)
  threadgroup float* thread_dhpre;  // [THREADS][IB]: per-thread dH_pre of its row block
  threadgroup float* sg_dhpost;     // [NSIMD][pad]: per-simdgroup dH_post
};

template <int W, typename MA>
inline void backward_tokens(device const T* x, device const T* dout, device T* dx, device const float* w,
                            device const float* inv_rms, device float* dw, MA ma, Smem s, int n, int C, int B,
                            uint group, uint groups, Tid t) {
  constexpr int NM = W == 1 ? 0 : NMAX;
  constexpr int NMB = DM_IN_REGISTERS ? NMAX : NM;  // dm[i] needs i known at compile time
  const int pad = padded_streams(n), nib = pad / IB, nvec = C / W;
  const int lane = int(t.lane), sg = int(t.sg);
  float dm[DM_IN_REGISTERS ? NMAX : 1][DM_IN_REGISTERS ? IB : 1] = {};
  // Pass B gives each thread one fixed row block j0 (threads past per_block * nib idle there), so
  // dH_pre accumulates in registers and is reduced in a fixed order at the end: deterministic.
  const int per_block = THREADS / nib, active = per_block * nib;
  const int j0 = (int(t.tid) % nib) * IB;
  float dhpre[IB] = {};
  for (int c = int(t.tid) * W; c < C; c += THREADS * W) {
    for (int e = 0; e < W; ++e) dw[c + e] = 0.0f;  // the columns this thread owns in every token
  }
  for (uint b = group; b < uint(B); b += groups) {
    const size_t off = size_t(b) * n * C;
    device const T* xb = x + off;
    device const T* db = dout + off;
    const float r = inv_rms[b];
    // pass A: one column vector at a time, every stream. The loop is simdgroup-uniform
    // (simd_sum inside): lanes past the last column take part with zeros.
    float dot = 0.0f;
    for (int c = int(t.tid) * W; c - lane * W < C; c += THREADS * W) {
      const bool valid = c < C;
      float a[W] = {}, dy[W] = {}, y[W] = {};
      if (valid) {
        for (int j = 0; j < stream_bound<NM>(n); ++j) {
          if (j >= n) break;
          float xv[W];
          load_w<T, W>(xb + j * C + c, xv);
          for (int e = 0; e < W; ++e) a[e] = fma(s.hpre[j], xv[e], a[e]);
        }
        for (int e = 0; e < W; ++e) y[e] = a[e] * r * w[c + e];
      }
      for (int i = 0; i < stream_bound<NM>(n); ++i) {
        if (i >= n) break;
        float d[W] = {};
        if (valid) load_w<T, W>(db + i * C + c, d);
        float p = 0.0f;
        for (int e = 0; e < W; ++e) {
          dy[e] = fma(s.hpost[i], d[e], dy[e]);
          p = fma(d[e], y[e], p);
        }
        p = simd_sum(p);
        if (lane == 0) s.sg_dhpost[sg * pad + i] += p;
      }
      if (valid) {
        for (int e = 0; e < W; ++e) {
          dot = fma(dy[e] * w[c + e], a[e], dot);
          dw[c + e] = fma(dy[e] * a[e], r, dw[c + e]);
        }
      }
    }
    dot = block_sum(dot, s.scratch, t);
    const float k = r * r * r * dot / C;
    // pass B: IB streams j0.. of one column vector per work item (this thread's fixed j0)
    for (int v = int(t.tid) / nib; int(t.tid) < active && v < nvec; v += per_block) {
      const int c = v * W;
      float acc[IB][W] = {}, xj[IB][W], dy[W] = {}, a[W] = {};
      for (int q = 0; q < IB; ++q) {
        if (j0 + q < n) {
          load_w<T, W>(xb + (j0 + q) * C + c, xj[q]);
        } else {
          for (int e = 0; e < W; ++e) xj[q][e] = 0.0f;
        }
      }
      for (int i = 0; i < stream_bound<NMB>(n); ++i) {
        if (i >= n) break;
        float d[W];
        load_w<T, W>(db + i * C + c, d);
        for (int e = 0; e < W; ++e) dy[e] = fma(s.hpost[i], d[e], dy[e]);
        for (int q = 0; q < IB; ++q) {
          const float m = ma(i, j0 + q);
          float p = 0.0f;
          for (int e = 0; e < W; ++e) {
            acc[q][e] = fma(m, d[e], acc[q][e]);
            p = fma(d[e], xj[q][e], p);
          }
          if (DM_IN_REGISTERS) dm[DM_IN_REGISTERS ? i : 0][DM_IN_REGISTERS ? q : 0] += p;
        }
      }
      // agg for these columns: from the rows in registers when one block holds them all
      if (nib == 1) {
        for (int q = 0; q < IB; ++q) {
          for (int e = 0; e < W; ++e) a[e] = fma(s.hpre[q], xj[q][e], a[e]);
        }
      } else {
        for (int j = 0; j < stream_bound<NM>(n); ++j) {
          if (j >= n) break;
          float xv[W];
          load_w<T, W>(xb + j * C + c, xv);
          for (int e = 0; e < W; ++e) a[e] = fma(s.hpre[j], xv[e], a[e]);
        }
      }
      for (int e = 0; e < W; ++e) {
        const float dagg = r * dy[e] * w[c + e] - k * a[e];
        for (int q = 0; q < IB; ++q) {
          acc[q][e] = fma(s.hpre[j0 + q], dagg, acc[q][e]);
          dhpre[q] = fma(dagg, xj[q][e], dhpre[q]);
        }
      }
      for (int q = 0; q < IB; ++q) {
        if (j0 + q < n) store_w<T, W>(dx + off + (j0 + q) * C + c, acc[q]);
      }
    }
  }
  for (int q = 0; q < IB; ++q) s.thread_dhpre[int(t.tid) * IB + q] = int(t.tid) < active ? dhpre[q] : 0.0f;
  if (DM_IN_REGISTERS) {
    // dm[i][q] belongs to (i, q): with NMAX <= 4 there is one row block (j0 = 0)
    for (int i = 0; i < (DM_IN_REGISTERS ? NMAX : 0); ++i) {
      for (int q = 0; q < IB; ++q) {
        const float v = simd_sum(dm[i][q]);
        if (lane == 0) s.sg_dM[sg * DM_SLOTS + i * NMAX + q] = v;
      }
    }
  }
}

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const T* dout [[buffer(1)]],
                      device const float* M [[buffer(2)]], device const float* H_pre_raw [[buffer(3)]],
                      device const float* H_post_raw [[buffer(4)]], device const float* w [[buffer(5)]],
                      device const float* inv_rms [[buffer(6)]], constant Scalars& s [[buffer(7)]],
                      device T* dx [[buffer(8)]], device float* partial [[buffer(9)]],
                      uint tid [[thread_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]], uint3 tgid [[threadgroup_position_in_grid]],
                      uint3 ntg [[threadgroups_per_grid]]) {
  const Tid t{tid, lane, sg};
  const int n = s.n, C = s.C, pad = padded_streams(n);
  threadgroup float hpre[PADCAP];
  threadgroup float hpost[PADCAP];
  threadgroup float scratch[NSIMD];
  threadgroup float sg_dM[NSIMD * DM_SLOTS];
  threadgroup float thread_dhpre[THREADS * IB];
  threadgroup float sg_dhpost[NSIMD * PADCAP];
#if MHC_NMAX > 0
  threadgroup float Mr[NMAX * PADCAP];
  stage_matrix<false>(M, n, Mr, t);
  const StagedM<false> ma{Mr, pad};
#else
  const DeviceM ma{M, n};
#endif
  stage_activation(H_pre_raw, 1.0f, n, hpre, t);
  stage_activation(H_post_raw, 2.0f, n, hpost, t);
  for (int k = int(tid); k < NSIMD * DM_SLOTS; k += THREADS) sg_dM[k] = 0.0f;
  for (int k = int(tid); k < NSIMD * pad; k += THREADS) sg_dhpost[k] = 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int P = n * n + 2 * n + C;
  device float* out = partial + size_t(tgid.x) * P;
  const Smem sm{hpre, hpost, scratch, sg_dM, thread_dhpre, sg_dhpost};
  if (vec_ok(C)) {
    backward_tokens<VEC>(x, dout, dx, w, inv_rms, out + n * n + 2 * n, ma, sm, n, C, s.B, tgid.x, ntg.x, t);
  } else {
    backward_tokens<1>(x, dout, dx, w, inv_rms, out + n * n + 2 * n, ma, sm, n, C, s.B, tgid.x, ntg.x, t);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // [dM | dH_pre | dH_post]: sums of the simdgroup slots (dw is already in place)
  for (int k = int(tid); k < n * n + 2 * n; k += THREADS) {
    float v = 0.0f;
    if (k < n * n) {
      if (DM_IN_REGISTERS) {
        const int i = k / n, j = k % n;
        for (int q = 0; q < NSIMD; ++q) v += sg_dM[q * DM_SLOTS + i * NMAX + j];
      }
    } else if (k < n * n + n) {  // fixed-order sum over the threads that own row k - n*n
      const int j = k - n * n, nib = pad / IB;
      for (int q = (j / IB) % nib; q < (THREADS / nib) * nib; q += nib) v += thread_dhpre[q * IB + j % IB];
    } else {
      for (int q = 0; q < NSIMD; ++q) v += sg_dhpost[q * pad + k - n * n - n];
    }
    out[k] = v;
  }
}
