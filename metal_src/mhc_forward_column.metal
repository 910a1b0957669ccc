// Static mHC forward, strategy `column`, step 2 of 2: threadgroup (tile, b) sums token b's
// partials into inv_rms, recomputes agg for its TILE_C columns (x is re-read: cheap when B is
// small, which is when this strategy is chosen) and writes out for those columns.
// Mirrors cuda_src/mhc_forward_column.cu (agg in registers here, in shared memory there).
// Launch: grid (ntiles * THREADS, B, 1), threadgroup (THREADS, 1, 1);
// threadgroup memory: Mt[NMAX * PADCAP] (NMAX > 0) + hpre + hpost + NSIMD.
#include "mhc_column_common.h"

using namespace mhc;

static_assert((NMAX > 0 ? NMAX * PADCAP : 0) + 2 * PADCAP + NSIMD <= TG_FLOATS_MAX, "threadgroup memory over 32 KB");

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
  float eps;
};

template <int W, typename MA>
inline void column_tile(device const T* xb, device T* ob, device const float* w, MA ma, threadgroup const float* hpre,
                        threadgroup const float* hpost, int n, int C, int c0, int c1, float r, Tid t) {
  ForwardExtra<W> extra{hpre, hpost, w, r, {}};
  mix_pass<T, W>(xb, ob, ma, n, C, c0, c1, extra, t);
}

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const float* M [[buffer(1)]],
                      device const float* H_pre_raw [[buffer(2)]], device const float* H_post_raw [[buffer(3)]],
                      device const float* w [[buffer(4)]], device const float* partial [[buffer(5)]],
                      constant Scalars& s [[buffer(6)]], device T* out [[buffer(7)]],
                      device float* inv_rms [[buffer(8)]], uint tid [[thread_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint3 tgid [[threadgroup_position_in_grid]], uint3 ntg [[threadgroups_per_grid]]) {
  const Tid t{tid, lane, sg};
  const int n = s.n, C = s.C;
  threadgroup float hpre[PADCAP];
  threadgroup float hpost[PADCAP];
  threadgroup float scratch[NSIMD];
#if MHC_NMAX > 0
  threadgroup float Mt[NMAX * PADCAP];
  stage_matrix<true>(M, n, Mt, t);
  const StagedM<true> ma{Mt, padded_streams(n)};
#else
  const DeviceM ma{M, n};
#endif
  stage_activation(H_pre_raw, 1.0f, n, hpre, t);
  stage_activation(H_post_raw, 2.0f, n, hpost, t);
  const int tile = int(tgid.x), b = int(tgid.y), ntiles = int(ntg.x);
  float ss = 0.0f;
  for (int k = int(tid); k < ntiles; k += THREADS) ss += partial[b * ntiles + k];
  ss = block_sum(ss, scratch, t);  // also publishes the staged parameters
  const float r = precise::rsqrt(ss / C + s.eps);
  if (tile == 0 && tid == 0) inv_rms[b] = r;
  const int c0 = tile * TILE_C, c1 = min(C, c0 + TILE_C);
  device const T* xb = x + size_t(b) * n * C;
  device T* ob = out + size_t(b) * n * C;
  if (vec_ok(C)) {
    column_tile<VEC>(xb, ob, w, ma, hpre, hpost, n, C, c0, c1, r, t);
  } else {
    column_tile<1>(xb, ob, w, ma, hpre, hpost, n, C, c0, c1, r, t);
  }
}
