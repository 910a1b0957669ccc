// Backward dphi on tensor cores, for bfloat16 x and M = n n + 2 n <= 32 (n <= 4):
//   part[s, k, m] = sum_{t in split s} x[t, k] dz[t, m]
// the same partials as mhc_dynamic_skinny's dphi (which serves every other case); their sum over
// s is mhc_dynamic_colsum's. bfloat16 x is exact in the bfloat16 MMA; float32 dz is split as
// dz = hi + mid + lo (three bfloat16 terms, exact to 2^-24 relative): three MMAs, float32 sums.
// CTA: 128 k's (8 warps x 16) x 32 columns; tokens staged through shared memory TC at a time
// with 16-byte loads along k (element loads when rows are not 16-byte aligned); the split over
// tokens (grid z) keeps the GPU busy. Grid (threads): (THREADS, ceil(K / 128), S). Needs sm_80+.
#include <mma.h>

#include "mhc_dynamic_common.cuh"

using namespace mhc;
using namespace nvcuda;

namespace {
constexpr int KB = 128, MP = 32, TC = 64;
constexpr int XLD = KB + 8;  // bf16 per token row of the x tile (multiple of 8; 16-row steps stay 32-byte aligned)
constexpr int ZLD = MP + 8;  // bf16 per token row of the dz tiles
constexpr int OLD = MP + 4;  // floats per output row
constexpr int XBYTES = TC * XLD * 2 > KB * OLD * 4 ? TC * XLD * 2 : KB * OLD * 4;
}

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const bf16* __restrict__ x, const float* __restrict__ dz, float* __restrict__ part,
    int Tn, int K, int M, int tsplit) {
  __shared__ __align__(32) unsigned char xbuf[XBYTES];
  __shared__ __align__(32) bf16 zs[3][TC][ZLD];  // dz = zs[0] + zs[1] + zs[2]
  bf16 (*xs)[XLD] = reinterpret_cast<bf16 (*)[XLD]>(xbuf);  // xs[t][k]
  const int tid = threadIdx.x, warp = tid / 32;
  const int k0 = blockIdx.y * KB, s = blockIdx.z;
  const int t_begin = s * tsplit, t_end = min(Tn, t_begin + tsplit);
  constexpr int V = 8;
  const bool vec = K % V == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  for (int tt0 = t_begin; tt0 < t_end; tt0 += TC) {
    __syncthreads();  // the previous stage is consumed
    for (int e = tid; e < TC * KB / V; e += THREADS) {
      const int r = e / (KB / V), c = (e % (KB / V)) * V, t = tt0 + r, k = k0 + c;
      float v[V];
      if (vec && t < t_end && k + V <= K) {
        load_vec(x + (size_t)t * K + k, v);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = (t < t_end && k + q < K) ? to_float(x[(size_t)t * K + k + q]) : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) xs[r][c + q] = from_float<bf16>(v[q]);  // exact: v came from bfloat16
    }
    for (int e = tid; e < TC * MP; e += THREADS) {
      const int r = e / MP, m = e % MP, t = tt0 + r;
      const float g = (t < t_end && m < M) ? dz[(size_t)t * M + m] : 0.0f;
      const bf16 hi = from_float<bf16>(g);
      const float r1 = g - to_float(hi);
      const bf16 mid = from_float<bf16>(r1);
      zs[0][r][m] = hi;
      zs[1][r][m] = mid;
      zs[2][r][m] = from_float<bf16>(r1 - to_float(mid));
    }
    __syncthreads();
#pragma unroll
    for (int tt = 0; tt < TC; tt += 16) {
      // A = x^T: element (k, t) of this warp's 16 x 16 block is xs[tt + t][warp * 16 + k]
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a;
      wmma::load_matrix_sync(a, &xs[tt][warp * 16], XLD);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
        for (int p = 0; p < 3; ++p) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
          wmma::load_matrix_sync(b, &zs[p][tt][nb * 16], ZLD);
          wmma::mma_sync(acc[nb], a, b, acc[nb]);
        }
      }
    }
  }
  __syncthreads();  // every warp is done with xs: reuse its bytes for the output tile
  float (*os)[OLD] = reinterpret_cast<float (*)[OLD]>(xbuf);
  wmma::store_matrix_sync(&os[warp * 16][0], acc[0], OLD, wmma::mem_row_major);
  wmma::store_matrix_sync(&os[warp * 16][16], acc[1], OLD, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < KB * M; e += THREADS) {
    const int r = e / M, m = e % M, k = k0 + r;
    if (k < K) part[((size_t)s * K + k) * M + m] = os[r][m];
  }
}
