// Sinkhorn-Knopp forward in one launch (paper eq. 9): M = sinkhorn(exp(L - rowmax(L))).
// `iters` rounds of row normalisation (a row whose sum is <= eps stays) then column
// normalisation (a column whose sum is <= eps becomes zero), all in float32.
// One threadgroup. n <= 32 with SMALL_THREADS threads: the matrix lives in registers, one
// simdgroup per row (threadgroup: TILE + SMALL_N floats). Otherwise the [n, n] matrix lives in
// threadgroup memory when n * n <= SINKHORN_TG_FLOATS (use_smem = 1, the launcher's rule), else
// it is worked on in place in M: any n works. Mirrors cuda_src/mhc_sinkhorn_fwd.cu.
// Launch: grid = threadgroup = (SMALL_THREADS or THREADS, 1, 1).
#include "mhc_sinkhorn_common.h"

using namespace mhc;

// Threadgroup capacity for the matrix of the general path: n <= 64 (16 KB).
constant constexpr int SINKHORN_TG_FLOATS = 64 * 64;
static_assert(SINKHORN_TG_FLOATS + TILE + SMALL_N <= TG_FLOATS_MAX, "threadgroup memory over 32 KB");

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int iters;
  float eps;
  int use_smem;
};

template <typename Ptr>
inline void sinkhorn_forward(device const float* L, Ptr P, int n, int iters, float eps, Tid t) {
  exp_shifted_rows(L, P, n, t);
  sync_all();
  for (int it = 0; it < iters; ++it) {
    normalize_rows(P, n, eps, nullptr, t);
    sync_all();
    normalize_cols(P, n, eps, nullptr, t);
    sync_all();
  }
}

kernel void MHC_ENTRY(device const float* L [[buffer(0)]], constant Scalars& s [[buffer(1)]],
                      device float* M [[buffer(2)]], uint tid [[thread_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint3 tpg [[threads_per_threadgroup]]) {
  threadgroup float P[SINKHORN_TG_FLOATS];
  threadgroup float T[TILE];
  threadgroup float col[SMALL_N];
  const Tid t{tid, lane, sg};
  const int n = s.n;
  const float eps = s.eps;
  if (n <= SMALL_N && tpg.x == uint(SMALL_THREADS)) {
    const int i = int(sg), j = int(lane);
    const bool ok = i < n && j < n;
    const float l = ok ? L[i * n + j] : -INFINITY;
    const float m = simd_max(l);  // every lane takes part (not inside the conditional below)
    float p = ok ? precise::exp(l - m) : 0.0f;
    for (int it = 0; it < s.iters; ++it) {
      const float r = simd_sum(p);
      p *= r > eps ? 1.0f / r : 1.0f;
      const float c = column_sum(p, T, col, t);
      p = ok ? p * (c > eps ? 1.0f / c : 0.0f) : 0.0f;
    }
    if (ok) M[i * n + j] = p;
    return;
  }
  if (s.use_smem) {
    sinkhorn_forward(L, &P[0], n, s.iters, eps, t);
    for (int k = int(tid); k < n * n; k += THREADS) M[k] = P[k];
  } else {
    sinkhorn_forward(L, M, n, s.iters, eps, t);
  }
}
