// The two passes over a token's columns that the forward, column and mix_add kernels share.
// Mirrored by metal_src/mhc_token_passes.h.
//
// W is the number of columns one work item covers: Vec<T>::N on the 16-byte path, 1 on the
// scalar path (odd C or unaligned views). Streams of a token are rows of x[b] = [n, C].
#pragma once

#include "mhc_common.cuh"

namespace mhc {

template <typename E, int W>
__device__ __forceinline__ void load_w(const E* p, float (&v)[W]) {
  if constexpr (W == Vec<E>::N) {
    load_vec(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = to_float(p[k]);
  }
}

template <typename E, int W>
__device__ __forceinline__ void store_w(E* p, const float (&v)[W]) {
  if constexpr (W == Vec<E>::N) {
    store_vec(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = from_float<E>(v[k]);
  }
}

// Rows of the mixing matrix padded to a multiple of IB, so the IB-row register tile never
// needs a bounds check: pad = ceil(n / IB) * IB.
__device__ __forceinline__ int padded_streams(int n) { return (n + IB - 1) / IB * IB; }

// Stage parameters into shared memory (null pointers are skipped): Mt[j * pad + i] = M[i, j]
// (transposed so the IB rows a work item needs are consecutive banks; the backward, which needs
// columns of M, passes transpose = false to get Mt[i * pad + j] = M[i, j]), hpre[i] = sigmoid,
// hpost[i] = 2 sigmoid; zero padding.
__device__ __forceinline__ void stage_params(const float* M, const float* H_pre_raw, const float* H_post_raw,
                                             int n, float* Mt, float* hpre, float* hpost, bool transpose = true) {
  const int pad = padded_streams(n);
  for (int k = threadIdx.x; Mt && k < n * pad; k += blockDim.x) {
    const int a = k / pad, b = k % pad;
    Mt[k] = b < n ? (transpose ? M[b * n + a] : M[a * n + b]) : 0.0f;
  }
  for (int i = threadIdx.x; i < pad; i += blockDim.x) {
    if (hpre) hpre[i] = i < n ? sigmoid(H_pre_raw[i]) : 0.0f;
    if (hpost) hpost[i] = i < n ? 2.0f * sigmoid(H_post_raw[i]) : 0.0f;
  }
}

// Pass 1 (paper eq. 3, pre-aggregation): agg[c] = sum_j hpre[j] x[j, c] for the columns
// [c0, c1) of this CTA, written to agg[c - c0]; returns this thread's share of sum(agg^2).
template <typename E, int W>
__device__ __forceinline__ float aggregate_pass(const E* xb, const float* hpre, int n, int C, int c0, int c1,
                                                float* agg) {
  float ss = 0.0f;
#pragma unroll 2
  for (int c = c0 + threadIdx.x * W; c < c1; c += blockDim.x * W) {  // two vectors' loads in flight
    float a[W] = {};
    for_streams<(W == 1 ? 0 : NMAX)>(n, [&](int j) {
      float xv[W];
      load_w<E, W>(xb + (size_t)j * C + c, xv);
      const float h = hpre[j];
#pragma unroll
      for (int e = 0; e < W; ++e) a[e] = fmaf(h, xv[e], a[e]);
    });
#pragma unroll
    for (int e = 0; e < W; ++e) {
      ss = fmaf(a[e], a[e], ss);
      agg[c - c0 + e] = a[e];
    }
  }
  return ss;
}

// Pass 2 (paper eq. 3, residual mixing): out[i, c] = init(i, c) + sum_j M[i, j] x[j, c] for the
// columns [c0, c1). A work item is IB rows x W columns held in registers; consecutive threads
// take the row blocks of one column vector first, so a warp's x loads coalesce and hit L1.
// `init(i0, c, acc)` fills acc[r][e] with the term added to row i0 + r, column c + e.
template <typename E, int W, typename Init>
__device__ __forceinline__ void mix_pass(const E* xb, E* ob, const float* Mt, int n, int C, int c0, int c1,
                                         Init init) {
  const int pad = padded_streams(n), nib = pad / IB;
  const int nvec = (c1 - c0) / W;
  for (int item = threadIdx.x; item < nvec * nib; item += blockDim.x) {
    const int c = c0 + (item / nib) * W, i0 = (item % nib) * IB;
    float acc[IB][W];
    init(i0, c, acc);
    for_streams<(W == 1 ? 0 : NMAX)>(n, [&](int j) {
      float xv[W];
      load_w<E, W>(xb + (size_t)j * C + c, xv);
      const float* m = Mt + j * pad + i0;
#pragma unroll
      for (int r = 0; r < IB; ++r) {
#pragma unroll
        for (int e = 0; e < W; ++e) acc[r][e] = fmaf(m[r], xv[e], acc[r][e]);
      }
    });
#pragma unroll
    for (int r = 0; r < IB; ++r) {
      if (i0 + r < n) store_w<E, W>(ob + (size_t)(i0 + r) * C + c, acc[r]);
    }
  }
}

}  // namespace mhc
