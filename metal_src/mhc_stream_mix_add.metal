// out[b, i, c] = sum_j M[i, j] x[b, j, c] + bias[b, i, c]: the MHCRewire post-combine in one pass
// (x and bias read once, out written once). Threadgroup (tile, b) covers TILE_C columns of token b.
// Mirrors cuda_src/mhc_stream_mix_add.cu (bias added after the mix here, before it there).
// Launch: grid (ntiles * THREADS, B, 1), threadgroup (THREADS, 1, 1);
// threadgroup memory: Mt[NMAX * PADCAP] (NMAX > 0; the generic kernel reads M in place).
#include "mhc_column_common.h"

using namespace mhc;

static_assert(NMAX * PADCAP <= TG_FLOATS_MAX, "threadgroup memory over 32 KB");

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
};

// The mix_add pass-2 term: bias[i, c], loaded for the rows that exist.
template <int W>
struct MixAddExtra {
  device const T* bb;
  int n;
  int C;

  void begin() {}
  void stream(int, thread const float (&)[W]) {}
  void end(int i0, int c, thread float (&acc)[IB][W]) {
    for (int q = 0; q < IB; ++q) {
      if (i0 + q < n) {
        float bv[W];
        load_w<T, W>(bb + (i0 + q) * C + c, bv);
        for (int e = 0; e < W; ++e) acc[q][e] += bv[e];
      }
    }
  }
};

template <int W, typename MA>
inline void mix_add_tile(device const T* xb, device const T* bb, device T* ob, MA ma, int n, int C, int c0, int c1,
                         Tid t) {
  MixAddExtra<W> extra{bb, n, C};
  mix_pass<T, W>(xb, ob, ma, n, C, c0, c1, extra, t);
}

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const float* M [[buffer(1)]],
                      device const T* bias [[buffer(2)]], constant Scalars& s [[buffer(3)]],
                      device T* out [[buffer(4)]], uint tid [[thread_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                      uint3 tgid [[threadgroup_position_in_grid]]) {
  const Tid t{tid, lane, sg};
  const int n = s.n, C = s.C;
#if MHC_NMAX > 0
  threadgroup float Mt[NMAX * PADCAP];
  stage_matrix<true>(M, n, Mt, t);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const StagedM<true> ma{Mt, padded_streams(n)};
#else
  const DeviceM ma{M, n};
#endif
  const int tile = int(tgid.x), b = int(tgid.y);
  const int c0 = tile * TILE_C, c1 = min(C, c0 + TILE_C);
  const size_t off = size_t(b) * n * C;
  if (vec_ok(C)) {
    mix_add_tile<VEC>(x + off, bias + off, out + off, ma, n, C, c0, c1, t);
  } else {
    mix_add_tile<1>(x + off, bias + off, out + off, ma, n, C, c0, c1, t);
  }
}
