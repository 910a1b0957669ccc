// Sums the backward's per-threadgroup partials over threadgroups in a fixed order
// (deterministic, no atomics) and applies the activations' derivatives (paper eq. 8):
//   dH_pre_raw = dH_pre * s (1 - s) with s = sigmoid(H_pre_raw)
//   dH_post_raw = dH_post * 2 s (1 - s) with s = sigmoid(H_post_raw)
// partial: [G, n*n + 2n + C] from mhc_backward_fused; partial_dm: [G_dm, n*n] from
// mhc_backward_dm, used for dM when G_dm > 0 (then partial's dM section is ignored).
// A thread owns one output column and walks the G rows. Mirrors cuda_src/mhc_backward_reduce.cu.
// Launch: grid (n*n + 2n + C, 1, 1) threads, threadgroup (THREADS, 1, 1).
#include "mhc_common.h"

using namespace mhc;

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int G;
  int G_dm;
  int n;
  int C;
};

kernel void MHC_ENTRY(device const float* partial [[buffer(0)]], device const float* partial_dm [[buffer(1)]],
                      device const float* H_pre_raw [[buffer(2)]], device const float* H_post_raw [[buffer(3)]],
                      constant Scalars& s [[buffer(4)]], device float* dM [[buffer(5)]],
                      device float* dH_pre_raw [[buffer(6)]], device float* dH_post_raw [[buffer(7)]],
                      device float* dw [[buffer(8)]], uint tid [[thread_index_in_threadgroup]],
                      uint3 tgid [[threadgroup_position_in_grid]]) {
  const int n = s.n, C = s.C, G = s.G, G_dm = s.G_dm;
  const int P = n * n + 2 * n + C;
  const int k = int(tgid.x) * THREADS + int(tid);
  if (k >= P) return;
  float acc = 0.0f;
  if (k < n * n && G_dm > 0) {
    for (int g = 0; g < G_dm; ++g) acc += partial_dm[size_t(g) * n * n + k];
  } else {
    for (int g = 0; g < G; ++g) acc += partial[size_t(g) * P + k];
  }
  if (k < n * n) {
    dM[k] = acc;
  } else if (k < n * n + n) {
    const float sg = sigmoid(H_pre_raw[k - n * n]);
    dH_pre_raw[k - n * n] = acc * sg * (1.0f - sg);
  } else if (k < n * n + 2 * n) {
    const float sg = sigmoid(H_post_raw[k - n * n - n]);
    dH_post_raw[k - n * n - n] = acc * 2.0f * sg * (1.0f - sg);
  } else {
    dw[k - n * n - 2 * n] = acc;
  }
}
