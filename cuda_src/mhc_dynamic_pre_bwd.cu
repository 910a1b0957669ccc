// Backward of mhc_dynamic_pre (_mhc_pre_bwd_kernel, src/liger_kernel/ops/mhc.py:936-961):
//   dx[j, c] = dx_in[c] h_pre[j],   dh_pre[j] = sum_c dx_in[c] x[j, c],   per token.
// Inputs: x [T, n, C], h_pre [T, n], dx_in [T, C]. Outputs: dx [T, n, C] (MHC_DTYPE; [1] and not
// written when !want_dx: mhc_dynamic_coeffs_bwd's one-thread-per-token mode takes the dots alone,
// and dx of the pre-aggregation is added by mhc_dynamic_dx), dh_pre [T, n].
// Grid (threads): (T * THREADS, 1, 1). Shared memory: n + n + WARPS * max(NMAX, 1) + max(NMAX, 1) floats.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ h_pre, const T* __restrict__ g,
    T* __restrict__ dx, float* __restrict__ dh_pre, int n, int C, int want_dx) {
  extern __shared__ float smem[];
  float* hp = smem;          // n
  float* dots = hp + n;      // n
  float* scratch = dots + n; // WARPS * NR + NR
  const int t = blockIdx.x, tid = threadIdx.x;
  for (int j = tid; j < n; j += THREADS) hp[j] = h_pre[(size_t)t * n + j];
  __syncthreads();
  const T* xt = x + (size_t)t * n * C;
  const T* gt = g + (size_t)t * C;
  T* dxt = dx + (size_t)t * n * C;
  constexpr int V = Vec<T>::N;
  if (want_dx && vec_ok<T>(C, gt, dxt)) {
    for (int v = tid; v < C / V; v += THREADS) {
      float gv[V];
      load_vec(gt + v * V, gv);
      for (int j = 0; j < n; ++j) {
        float d[V];
#pragma unroll
        for (int e = 0; e < V; ++e) d[e] = gv[e] * hp[j];
        store_vec(dxt + (size_t)j * C + v * V, d);
      }
    }
  } else if (want_dx) {
    for (int c = tid; c < C; c += THREADS) {
      const float gc = to_float(gt[c]);
      for (int j = 0; j < n; ++j) dxt[(size_t)j * C + c] = from_float<T>(gc * hp[j]);
    }
  }
  dyn::stream_dots<NMAX>(xt, gt, n, C, scratch, dots);
  for (int j = tid; j < n; j += THREADS) dh_pre[(size_t)t * n + j] = dots[j];
}
