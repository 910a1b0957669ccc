// Sinkhorn-Knopp forward in one launch (paper eq. 9): M = sinkhorn(exp(L - rowmax(L))).
// `iters` rounds of row normalisation (a row whose sum is <= eps stays) then column
// normalisation (a column whose sum is <= eps becomes zero), all in float32.
// One CTA. n <= 32 with SMALL_THREADS threads: the matrix lives in registers, one warp per row
// (shared: TILE + SMALL_N floats). Otherwise the [n, n] matrix lives in shared memory when the
// launcher gives n*n floats of it (use_smem = 1), else it is worked on in place in M (global,
// L1-resident): any n works.
// Launch: grid = threadgroup = (SMALL_THREADS or THREADS, 1, 1).
#include "mhc_sinkhorn_common.cuh"

using namespace mhc;

// M is not __restrict__: without shared memory it is the working matrix, rewritten between
// reads by other threads of the CTA (see mhc_sinkhorn_bwd.cu).
extern "C" __global__ void __launch_bounds__(SMALL_THREADS) MHC_NAME(const float* L, float* M, int n, int iters, float eps,
                                                                 int use_smem) {
  extern __shared__ float smem[];
  if (n <= SMALL_N && blockDim.x == SMALL_THREADS) {
    const int i = threadIdx.x >> 5, j = threadIdx.x & 31;
    const bool ok = i < n && j < n;
    const float l = ok ? L[i * n + j] : -INFINITY;
    const float m = warp_max(l);  // every lane shuffles: never inside a lane-dependent branch
    float p = ok ? expf(l - m) : 0.0f;
    for (int t = 0; t < iters; ++t) {
      const float r = warp_sum(p);
      p *= sk_recip(r, eps, 1.0f);
      const float c = column_sum(p, smem, smem + TILE);
      p = ok ? p * sk_recip(c, eps, 0.0f) : 0.0f;
    }
    if (ok) M[i * n + j] = p;
    return;
  }
  float* P = use_smem ? smem : M;
  exp_shifted_rows(L, P, n);
  __syncthreads();
  for (int t = 0; t < iters; ++t) {
    normalize_rows(P, n, eps, nullptr);
    __syncthreads();
    normalize_cols(P, n, eps, nullptr);
    __syncthreads();
  }
  if (use_smem) {
    for (int k = threadIdx.x; k < n * n; k += blockDim.x) M[k] = P[k];
  }
}
