// Backward of mhc_dynamic_pre (_mhc_pre_bwd_kernel, src/liger_kernel/ops/mhc.py:936-961):
//   dx[j, c] = dx_in[c] h_pre[j],   dh_pre[j] = sum_c dx_in[c] x[j, c],   per token.
// Mirrors cuda_src/mhc_dynamic_pre_bwd.cu. Inputs: x [T, n, C], h_pre [T, n], g = dx_in [T, C].
// Outputs: dx [T, n, C] (MHC_DTYPE; [1] and not written when !want_dx), dh_pre [T, n].
// Launch: grid (T * THREADS, 1, 1), threadgroup (THREADS, 1, 1): one threadgroup per token.
// Threadgroup memory (static): the dots' scratch and result, NCAP floats of dots (the launcher keeps
// n <= GENERIC_N_LIMIT).
#include "mhc_dynamic_common.h"

using namespace mhc;

static_assert((NSIMD + 1) * (NMAX > 0 ? NMAX : 1) + NCAP <= TG_FLOATS_MAX, "threadgroup memory over 32 KB");

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
  int want_dx;
};

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const float* h_pre [[buffer(1)]],
                      device const T* g [[buffer(2)]], constant Scalars& s [[buffer(3)]], device T* dx [[buffer(4)]],
                      device float* dh_pre [[buffer(5)]], uint tid [[thread_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint3 tgid [[threadgroup_position_in_grid]]) {
  threadgroup float scratch[(NSIMD + 1) * (NMAX > 0 ? NMAX : 1)];
  threadgroup float dots[NCAP];
  const Tid tt{tid, lane, sg};
  const int n = s.n, C = s.C, t = int(tgid.x);
  device const T* xt = x + size_t(t) * n * C;
  device const float* hp = h_pre + size_t(t) * n;
  device const T* gt = g + size_t(t) * C;
  if (s.want_dx) {
    device T* dxt = dx + size_t(t) * n * C;
    if (vec_ok(C)) {
      for (int v = int(tid); v < C / VEC; v += THREADS) {
        float gv[VEC];
        load_w<T, VEC>(gt + v * VEC, gv);
        for (int j = 0; j < n; ++j) {
          float d[VEC];
          const float hj = hp[j];
          for (int e = 0; e < VEC; ++e) d[e] = gv[e] * hj;
          store_w<T, VEC>(dxt + size_t(j) * C + v * VEC, d);
        }
      }
    } else {
      for (int c = int(tid); c < C; c += THREADS) {
        const float gc = to_float(gt[c]);
        for (int j = 0; j < n; ++j) dxt[size_t(j) * C + c] = from_float<T>(gc * hp[j]);
      }
    }
  }
  stream_dots<NMAX>(xt, gt, n, C, scratch, dots, tt);
  for (int j = int(tid); j < n; j += THREADS) dh_pre[size_t(t) * n + j] = dots[j];
}
