// x_out[t, o, c] = sum_i h_res[t, o, i] x[t, i, c] + h_post[t, o] f[t, c] in float32, stored in
// MHC_DTYPE: LigerMHCPostResFunction (src/liger_kernel/ops/mhc.py:1096-1110, same order: the
// h_post f term first, then streams i = 0, 1, ...). Mirrors cuda_src/mhc_dynamic_post_res.cu: x and
// f read once, x_out written once.
// Inputs: x [T, n, C], f [T, C] (MHC_DTYPE), h_post [T, n], h_res [T, n, n] (float32).
// Output: x_out [T, n, C]. Launch: grid (ceil(ceil(C / VEC) / THREADS) * THREADS, T, 1), threadgroup
// (THREADS, 1, 1): each thread VEC consecutive columns of every stream of one token (threadgroup y =
// the token). Compile-time NMAX >= n keeps the token's n vectors in registers; NMAX = 0 re-reads them
// per output stream (cache hits). The coefficients are read from device memory by every thread.
#include "mhc_dynamic_common.h"

using namespace mhc;

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
};

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const T* f [[buffer(1)]],
                      device const float* h_post [[buffer(2)]], device const float* h_res [[buffer(3)]],
                      constant Scalars& s [[buffer(4)]], device T* out [[buffer(5)]],
                      uint tid [[thread_index_in_threadgroup]], uint3 tgid [[threadgroup_position_in_grid]]) {
  constexpr int NA = NMAX > 0 ? NMAX : 1;
  const int n = s.n, C = s.C, t = int(tgid.y);
  const int v = int(tgid.x) * THREADS + int(tid);
  device const T* xt = x + size_t(t) * n * C;
  device const T* ft = f + size_t(t) * C;
  device const float* hpo = h_post + size_t(t) * n;
  device const float* hr = h_res + size_t(t) * n * n;
  device T* ot = out + size_t(t) * n * C;
  if (vec_ok(C)) {
    if (v >= C / VEC) return;
    float fv[VEC];
    load_w<T, VEC>(ft + v * VEC, fv);
    if (NMAX > 0) {  // the token's n vectors in registers, read once
      float xv[NA][VEC];
      for (int i = 0; i < NA; ++i)
        if (i < n) load_w<T, VEC>(xt + size_t(i) * C + v * VEC, xv[i]);
      for (int o = 0; o < NA; ++o) {
        if (o < n) {
          float acc[VEC];
          const float hp = hpo[o];
          for (int e = 0; e < VEC; ++e) acc[e] = fv[e] * hp;
          for (int i = 0; i < NA; ++i) {
            if (i < n) {
              const float w = hr[o * n + i];
              for (int e = 0; e < VEC; ++e) acc[e] += xv[i][e] * w;
            }
          }
          store_w<T, VEC>(ot + size_t(o) * C + v * VEC, acc);
        }
      }
      return;
    }
    for (int o = 0; o < n; ++o) {  // NMAX = 0: x's vectors re-read per output stream
      float acc[VEC];
      const float hp = hpo[o];
      for (int e = 0; e < VEC; ++e) acc[e] = fv[e] * hp;
      for (int i = 0; i < n; ++i) {
        float xv[VEC];
        load_w<T, VEC>(xt + size_t(i) * C + v * VEC, xv);
        const float w = hr[o * n + i];
        for (int e = 0; e < VEC; ++e) acc[e] += xv[e] * w;
      }
      store_w<T, VEC>(ot + size_t(o) * C + v * VEC, acc);
    }
    return;
  }
  // scalar path (C % VEC != 0): this thread's VEC columns v * VEC .. v * VEC + VEC - 1
  for (int c = v * VEC; c < min(C, v * VEC + VEC); ++c) {
    const float fc = to_float(ft[c]);
    for (int o = 0; o < n; ++o) {
      float acc = fc * hpo[o];
      for (int i = 0; i < n; ++i) acc += to_float(xt[size_t(i) * C + c]) * hr[o * n + i];
      ot[size_t(o) * C + c] = from_float<T>(acc);
    }
  }
}
