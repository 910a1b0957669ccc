// The two passes over a token's columns that the forward, column and mix_add kernels share.
// Mirrors cuda_src/mhc_token_passes.cuh.
//
// W is the number of columns one work item covers: VEC on the vector path, 1 on the scalar
// path (odd C). Streams of a token are rows of x[b] = [n, C].
// Metal keeps no per-column buffer (the CUDA kernels keep agg[C] in shared memory): pass 2
// recomputes what it needs from the x values it loads anyway, through an `Extra` functor:
//   extra.begin()              before the streams of one work item,
//   extra.stream(j, xv)        with the W values of stream j,
//   extra.end(i0, c, acc)      adds its term to the IB x W accumulator tile (rows i0.., cols c..).
#pragma once

#include "mhc_common.h"

namespace mhc {
namespace {

// Rows of the mixing matrix padded to a multiple of IB, so the IB-row register tile never
// needs a bounds check: pad = ceil(n / IB) * IB.
inline int padded_streams(int n) { return (n + IB - 1) / IB * IB; }

// Entry (i, j) of M from threadgroup memory, staged by stage_matrix (variants with NMAX > 0):
// TRANSPOSED: S[j * pad + i] (the forward: the IB rows a work item needs are consecutive);
// else S[i * pad + j] (the backward, which walks columns of M). Padding entries are zero.
template <bool TRANSPOSED>
struct StagedM {
  threadgroup const float* S;
  int pad;
  float operator()(int i, int j) const { return TRANSPOSED ? S[j * pad + i] : S[i * pad + j]; }
};

// Entry (i, j) of M read in place (generic variants); zero for padding rows and columns.
struct DeviceM {
  device const float* M;
  int n;
  float operator()(int i, int j) const { return (i < n && j < n) ? M[i * n + j] : 0.0f; }
};

template <bool TRANSPOSED>
inline void stage_matrix(device const float* M, int n, threadgroup float* S, Tid t) {
  const int pad = padded_streams(n);
  for (int k = int(t.tid); k < n * pad; k += THREADS) {
    const int a = k / pad, b = k % pad;
    S[k] = b < n ? (TRANSPOSED ? M[b * n + a] : M[a * n + b]) : 0.0f;
  }
}

// out[i] = scale * sigmoid(raw[i]) for i < n, zero up to pad (hpre: scale 1, hpost: scale 2).
inline void stage_activation(device const float* raw, float scale, int n, threadgroup float* out, Tid t) {
  const int pad = padded_streams(n);
  for (int i = int(t.tid); i < pad; i += THREADS) out[i] = i < n ? scale * sigmoid(raw[i]) : 0.0f;
}

// Pass 1 (paper eq. 3, pre-aggregation): this thread's share of sum_c agg[c]^2 over the
// columns [c0, c1), agg[c] = sum_j hpre[j] x[j, c].
template <typename E, int W>
inline float aggregate_pass(device const E* xb, threadgroup const float* hpre, int n, int C, int c0, int c1, Tid t) {
  constexpr int NM = W == 1 ? 0 : NMAX;
  float ss = 0.0f;
  for (int c = c0 + int(t.tid) * W; c < c1; c += THREADS * W) {
    float a[W] = {};
    for (int j = 0; j < stream_bound<NM>(n); ++j) {
      if (j >= n) break;
      float xv[W];
      load_w<E, W>(xb + j * C + c, xv);
      for (int e = 0; e < W; ++e) a[e] = fma(hpre[j], xv[e], a[e]);
    }
    for (int e = 0; e < W; ++e) ss = fma(a[e], a[e], ss);
  }
  return ss;
}

// Pass 2 (paper eq. 3, residual mixing): out[i, c] = sum_j M[i, j] x[j, c] + extra for the
// columns [c0, c1). A work item is IB rows x W columns held in registers; consecutive threads
// take the row blocks of one column vector first, so a simdgroup's x loads hit the same lines.
template <typename E, int W, typename MA, typename Extra>
inline void mix_pass(device const E* xb, device E* ob, MA ma, int n, int C, int c0, int c1, thread Extra& extra, Tid t) {
  constexpr int NM = W == 1 ? 0 : NMAX;
  const int pad = padded_streams(n), nib = pad / IB;
  const int nvec = (c1 - c0) / W;
  for (int item = int(t.tid); item < nvec * nib; item += THREADS) {
    const int c = c0 + (item / nib) * W, i0 = (item % nib) * IB;
    float acc[IB][W] = {};
    extra.begin();
    for (int j = 0; j < stream_bound<NM>(n); ++j) {
      if (j >= n) break;
      float xv[W];
      load_w<E, W>(xb + j * C + c, xv);
      extra.stream(j, xv);
      for (int r = 0; r < IB; ++r) {
        const float m = ma(i0 + r, j);
        for (int e = 0; e < W; ++e) acc[r][e] = fma(m, xv[e], acc[r][e]);
      }
    }
    extra.end(i0, c, acc);
    for (int r = 0; r < IB; ++r) {
      if (i0 + r < n) store_w<E, W>(ob + (i0 + r) * C + c, acc[r]);
    }
  }
}

// The forward's pass-2 term: H_post[i] * y[c] with y = agg * r * w, agg recomputed from the
// loaded x (x is already in registers: n more multiply-adds per column).
template <int W>
struct ForwardExtra {
  threadgroup const float* hpre;
  threadgroup const float* hpost;
  device const float* w;
  float r;
  float a[W];

  void begin() {
    for (int e = 0; e < W; ++e) a[e] = 0.0f;
  }
  void stream(int j, thread const float (&xv)[W]) {
    for (int e = 0; e < W; ++e) a[e] = fma(hpre[j], xv[e], a[e]);
  }
  void end(int i0, int c, thread float (&acc)[IB][W]) {
    for (int e = 0; e < W; ++e) {
      const float y = a[e] * r * w[c + e];
      for (int q = 0; q < IB; ++q) acc[q][e] = fma(hpost[i0 + q], y, acc[q][e]);
    }
  }
};

}  // namespace
}  // namespace mhc
