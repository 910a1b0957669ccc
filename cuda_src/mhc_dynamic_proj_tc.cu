// Forward projection on tensor cores, for bfloat16 x and M = n n + 2 n <= 32 (n <= 4):
//   part[s, t, m] = sum_{k in split s} x[t, k] phi[k, m],   sq[s, t] = sum_{k in split s} x[t, k]^2
// the same outputs as mhc_dynamic_skinny (which serves every other case). bfloat16 x is exact in
// the bfloat16 MMA; float32 phi is split as phi = hi + mid + lo (three bfloat16 terms, exact to
// 2^-24 relative), so three MMAs with float32 accumulation give a float32-accurate product.
// CTA: 128 tokens (8 warps x 16 rows) x 32 columns; K staged through shared memory KC at a time
// with 16-byte loads (element loads when x's rows are not 16-byte aligned); the split over K
// (grid y) keeps the GPU busy. WMMA fragments are loaded from and stored to shared memory only.
// Grid (threads): (THREADS, S, ceil(T / 128)): token tiles are the slowest grid dimension, so the
// tokens read last are still in L2 when mhc_dynamic_coeffs (which runs tokens in reverse) starts.
// Needs sm_80+.
#include <mma.h>

#include "mhc_dynamic_common.cuh"

using namespace mhc;
using namespace nvcuda;

namespace {
constexpr int TB = 128, MP = 32, KC = 64;
constexpr int XLD = KC + 8;  // bf16 elements per x row in shared memory (multiple of 8, rows 32-byte aligned)
constexpr int PLD = MP + 8;  // bf16 elements per phi row
constexpr int OLD = MP + 4;  // floats per output row
static_assert(TB * XLD * 2 == TB * OLD * 4, "the output staging reuses the x tile's bytes");
}

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const bf16* __restrict__ x, const float* __restrict__ phi, float* __restrict__ part, float* __restrict__ sq,
    int Tn, int K, int M, int ksplit) {
  __shared__ __align__(32) unsigned char xbuf[TB * XLD * 2];
  __shared__ __align__(32) bf16 ps[3][KC][PLD];  // phi = ps[0] + ps[1] + ps[2]
  bf16 (*xs)[XLD] = reinterpret_cast<bf16 (*)[XLD]>(xbuf);
  const int tid = threadIdx.x, warp = tid / 32;
  const int s = blockIdx.y, t0 = blockIdx.z * TB;  // token tiles slowest: the last tokens read stay in L2
  const int k_begin = s * ksplit, k_end = min(K, k_begin + ksplit);
  constexpr int V = 8;  // bf16 per 16-byte vector
  const bool vec = K % V == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 && ksplit % V == 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  float sqa[TB * KC / V / THREADS] = {};  // rows tid / 8 + 32 i: a fixed set per thread

  for (int k0 = k_begin; k0 < k_end; k0 += KC) {
    __syncthreads();  // the previous stage is consumed
#pragma unroll
    for (int i = 0; i < TB * KC / V / THREADS; ++i) {
      const int e = tid + i * THREADS, r = e / (KC / V), c = (e % (KC / V)) * V;
      const int t = t0 + r, k = k0 + c;
      float v[V];
      if (vec && t < Tn && k + V <= k_end) {
        load_vec(x + (size_t)t * K + k, v);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = (t < Tn && k + q < k_end) ? to_float(x[(size_t)t * K + k + q]) : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) {
        sqa[i] += v[q] * v[q];
        xs[r][c + q] = from_float<bf16>(v[q]);  // exact: v came from bfloat16
      }
    }
    for (int e = tid; e < KC * MP; e += THREADS) {
      const int kk = e / MP, m = e % MP, k = k0 + kk;
      const float p = (k < k_end && m < M) ? phi[(size_t)k * M + m] : 0.0f;
      const bf16 hi = from_float<bf16>(p);
      const float r1 = p - to_float(hi);
      const bf16 mid = from_float<bf16>(r1);
      ps[0][kk][m] = hi;
      ps[1][kk][m] = mid;
      ps[2][kk][m] = from_float<bf16>(r1 - to_float(mid));
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
      wmma::load_matrix_sync(a, &xs[warp * 16][kk], XLD);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
        for (int p = 0; p < 3; ++p) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
          wmma::load_matrix_sync(b, &ps[p][kk][nb * 16], PLD);
          wmma::mma_sync(acc[nb], a, b, acc[nb]);
        }
      }
    }
  }
  // sums of squares: the 8 threads of a row are 8 consecutive lanes
#pragma unroll
  for (int i = 0; i < TB * KC / V / THREADS; ++i) {
    float v = sqa[i];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    const int r = (tid + i * THREADS) / (KC / V), t = t0 + r;
    if (tid % (KC / V) == 0 && t < Tn) sq[(size_t)s * Tn + t] = v;
  }
  __syncthreads();  // every warp is done with xs: reuse its bytes for the output tile
  float (*os)[OLD] = reinterpret_cast<float (*)[OLD]>(xbuf);
  wmma::store_matrix_sync(&os[warp * 16][0], acc[0], OLD, wmma::mem_row_major);
  wmma::store_matrix_sync(&os[warp * 16][16], acc[1], OLD, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < TB * M; e += THREADS) {
    const int r = e / M, m = e % M, t = t0 + r;
    if (t < Tn) part[((size_t)s * Tn + t) * M + m] = os[r][m];
  }
}
