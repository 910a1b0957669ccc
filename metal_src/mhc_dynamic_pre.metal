// x_in[t, c] = sum_j h_pre[t, j] x[t, j, c] in float32, stored in MHC_DTYPE: LigerMHCPreFunction
// (src/liger_kernel/ops/mhc.py:878-890; acc from 0, streams 0, 1, ... in order). Mirrors
// cuda_src/mhc_dynamic_pre.cu: x read once, x_in written once.
// Inputs: x [T, n, C], h_pre [T, n] (float32). Output: x_in [T, C].
// Launch: grid (ceil(ceil(C / VEC) / THREADS) * THREADS, T, 1), threadgroup (THREADS, 1, 1): each
// thread VEC consecutive columns of one token (threadgroup y = the token). Compile-time NMAX >= n
// unrolls the stream loop; the coefficients are read from device memory by every thread (cached).
#include "mhc_dynamic_common.h"

using namespace mhc;

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
};

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const float* h_pre [[buffer(1)]],
                      constant Scalars& s [[buffer(2)]], device T* x_in [[buffer(3)]],
                      uint tid [[thread_index_in_threadgroup]], uint3 tgid [[threadgroup_position_in_grid]]) {
  const int n = s.n, C = s.C, t = int(tgid.y);
  const int v = int(tgid.x) * THREADS + int(tid);
  device const T* xt = x + size_t(t) * n * C;
  device const float* h = h_pre + size_t(t) * n;
  device T* out = x_in + size_t(t) * C;
  if (vec_ok(C)) {
    if (v >= C / VEC) return;
    float acc[VEC];
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    for (int j = 0; j < stream_bound<NMAX>(n); ++j) {
      if (j < n) {
        float xv[VEC];
        load_w<T, VEC>(xt + size_t(j) * C + v * VEC, xv);
        const float hj = h[j];
        for (int e = 0; e < VEC; ++e) acc[e] += xv[e] * hj;
      }
    }
    store_w<T, VEC>(out + v * VEC, acc);
    return;
  }
  // scalar path (C % VEC != 0): this thread's VEC columns v * VEC .. v * VEC + VEC - 1
  for (int c = v * VEC; c < min(C, v * VEC + VEC); ++c) {
    float acc = 0.0f;
    for (int j = 0; j < n; ++j) acc += to_float(xt[size_t(j) * C + c]) * h[j];
    out[c] = from_float<T>(acc);
  }
}
