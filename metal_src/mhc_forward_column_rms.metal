// Static mHC forward, strategy `column`, step 1 of 2: per-tile partial sums of agg^2.
// For tokens too few to fill the GPU (small B) or too wide for one threadgroup: threadgroup
// (tile, b) covers columns [tile * TILE_C, ...) of token b and writes
// partial[b * ntiles + tile] = sum agg^2. Mirrors cuda_src/mhc_forward_column_rms.cu.
// Launch: grid (ntiles * THREADS, B, 1), threadgroup (THREADS, 1, 1); threadgroup memory: hpre + NSIMD.
#include "mhc_column_common.h"

using namespace mhc;

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
};

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const float* H_pre_raw [[buffer(1)]],
                      constant Scalars& s [[buffer(2)]], device float* partial [[buffer(3)]],
                      uint tid [[thread_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]], uint3 tgid [[threadgroup_position_in_grid]],
                      uint3 ntg [[threadgroups_per_grid]]) {
  const Tid t{tid, lane, sg};
  const int n = s.n, C = s.C;
  threadgroup float hpre[PADCAP];
  threadgroup float scratch[NSIMD];
  stage_activation(H_pre_raw, 1.0f, n, hpre, t);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int tile = int(tgid.x), b = int(tgid.y);
  const int c0 = tile * TILE_C, c1 = min(C, c0 + TILE_C);
  device const T* xb = x + size_t(b) * n * C;
  const float ss = vec_ok(C) ? tile_sumsq<VEC>(xb, hpre, n, C, c0, c1, t) : tile_sumsq<1>(xb, hpre, n, C, c0, c1, t);
  const float total = block_sum(ss, scratch, t);
  if (tid == 0) partial[b * int(ntg.x) + tile] = total;
}
