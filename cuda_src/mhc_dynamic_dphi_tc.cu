// Backward dphi on tensor cores, for bfloat16 x and M = n n + 2 n <= 32 (n <= 4):
//   part[s, k, m] = sum_{t in split s} x[t, k] dz[t, m]
// the same partials as mhc_dynamic_skinny's dphi (which serves every other case); their sum over
// s is mhc_dynamic_colsum's. bfloat16 x is exact in the bfloat16 MMA; float32 dz is split as
// dz = hi + mid + lo (three bfloat16 terms, exact to 2^-24 relative): three MMAs, float32 sums.
// CTA: 128 k's (8 warps x 16) x 32 columns; tokens stream through shared memory TC at a time,
// double-buffered as mhc_dynamic_proj_tc: stage s + 1's x tile in flight (cp.async, 16 bytes per
// copy; element loads when rows are not 16-byte aligned) and its dz values in registers while
// stage s's MMAs run. The split over tokens (grid z) is chosen by the launcher so that every CTA
// is resident at once. Grid (threads): (THREADS, ceil(K / 128), S). Shared memory (dynamic):
// SMEM_BYTES, or half of it when tsplit <= TC. Needs sm_80+.
#include <cuda_pipeline.h>
#include <mma.h>

#include "mhc_dynamic_common.cuh"

using namespace mhc;
using namespace nvcuda;

namespace {
constexpr int KB = 128, MP = 32, TC = 64;
constexpr int V = 8;          // bf16 per 16-byte vector
constexpr int XLD = KB + 8;   // bf16 per token row of the x tile (16-row steps stay 32-byte aligned)
constexpr int ZLD = MP + 8;   // bf16 per token row of the dz tiles
constexpr int OLD = MP + 4;   // floats per output row
constexpr int XV = TC * KB / V / THREADS;  // x vectors per thread per stage
constexpr int ZE = TC * MP / THREADS;      // dz values per thread per stage
// an x buffer also holds the output tile at the end
constexpr int X_BYTES = TC * XLD * 2 > KB * OLD * 4 ? TC * XLD * 2 : KB * OLD * 4;
constexpr int Z_BYTES = 3 * TC * ZLD * 2;
static_assert(X_BYTES % 32 == 0 && Z_BYTES % 32 == 0, "WMMA tiles stay 32-byte aligned");
// Buffer b = (x tile, dz tiles) at b * (X_BYTES + Z_BYTES). Two buffers: what the launcher passes
// (mhc_aot/cuda_dynamic.py DPHI_SMEM_BYTES); one when every CTA has a single stage (tsplit <= TC),
// which uses buffer 0 only.
constexpr int SMEM_BYTES = 2 * (X_BYTES + Z_BYTES);
static_assert(SMEM_BYTES == 67584, "keep DPHI_SMEM_BYTES in mhc_aot/cuda_dynamic.py equal");
}  // namespace

// three CTAs per SM (shared memory allows three): at most 85 registers per thread
extern "C" __global__ void __launch_bounds__(THREADS, 3) MHC_NAME(
    const bf16* __restrict__ x, const float* __restrict__ dz, float* __restrict__ part,
    int Tn, int K, int M, int tsplit) {
  extern __shared__ float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  auto xs = [&](int buf) { return reinterpret_cast<bf16 (*)[XLD]>(base + buf * (X_BYTES + Z_BYTES)); };  // xs[t][k]
  auto zs = [&](int buf, int p) {
    return reinterpret_cast<bf16 (*)[ZLD]>(base + buf * (X_BYTES + Z_BYTES) + X_BYTES + p * (Z_BYTES / 3));
  };
  const int tid = threadIdx.x, warp = tid / 32;
  const int k0 = blockIdx.y * KB, s = blockIdx.z;
  const int t_begin = s * tsplit, t_end = min(Tn, t_begin + tsplit);
  const bool vec = K % V == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;

  auto stage_x = [&](int tt0, int buf) {
    bf16 (*dst)[XLD] = xs(buf);
#pragma unroll
    for (int i = 0; i < XV; ++i) {
      const int e = tid + i * THREADS, r = e / (KB / V), c = (e % (KB / V)) * V, t = tt0 + r, k = k0 + c;
      if (vec && t < t_end && k + V <= K) {
        __pipeline_memcpy_async(&dst[r][c], x + (size_t)t * K + k, 16);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q)
          dst[r][c + q] = (t < t_end && k + q < K) ? x[(size_t)t * K + k + q] : from_float<bf16>(0.0f);
      }
    }
  };
  auto load_dz = [&](int tt0, float (&zr)[ZE]) {
#pragma unroll
    for (int i = 0; i < ZE; ++i) {
      const int e = tid + i * THREADS, r = e / MP, m = e % MP, t = tt0 + r;
      zr[i] = (t < t_end && m < M) ? dz[(size_t)t * M + m] : 0.0f;
    }
  };
  auto store_dz = [&](const float (&zr)[ZE], int buf) {
#pragma unroll
    for (int i = 0; i < ZE; ++i) {
      const int e = tid + i * THREADS, r = e / MP, m = e % MP;
      dyn::split_bf16x3(zr[i], zs(buf, 0)[r][m], zs(buf, 1)[r][m], zs(buf, 2)[r][m]);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  float zr[ZE];

  if (t_begin < t_end) {
    stage_x(t_begin, 0);
    __pipeline_commit();
    load_dz(t_begin, zr);
    store_dz(zr, 0);
  }
  for (int tt0 = t_begin, it = 0; tt0 < t_end; tt0 += TC, ++it) {
    const int buf = it & 1, nt = tt0 + TC;
    const bool next = nt < t_end;
    if (next) stage_x(nt, buf ^ 1);  // buffer buf ^ 1 was released by the previous iteration's last barrier
    __pipeline_commit();
    if (next) load_dz(nt, zr);
    __pipeline_wait_prior(1);  // this thread's copies of stage `it` have landed
    __syncthreads();           // everyone's have, and dz buffer buf is written
    bf16 (*xb)[XLD] = xs(buf);
#pragma unroll
    for (int tt = 0; tt < TC; tt += 16) {
      // A = x^T: element (k, t) of this warp's 16 x 16 block is xb[tt + t][warp * 16 + k]
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a;
      wmma::load_matrix_sync(a, &xb[tt][warp * 16], XLD);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
        for (int p = 0; p < 3; ++p) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
          wmma::load_matrix_sync(b, &zs(buf, p)[tt][nb * 16], ZLD);
          wmma::mma_sync(acc[nb], a, b, acc[nb]);
        }
      }
    }
    if (next) store_dz(zr, buf ^ 1);
    __syncthreads();  // buffers buf are consumed: the next iteration refills them
  }
  float (*os)[OLD] = reinterpret_cast<float (*)[OLD]>(base);  // x buffer 0 (free after the last barrier)
  wmma::store_matrix_sync(&os[warp * 16][0], acc[0], OLD, wmma::mem_row_major);
  wmma::store_matrix_sync(&os[warp * 16][16], acc[1], OLD, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < KB * M; e += THREADS) {
    const int r = e / M, m = e % M, k = k0 + r;
    if (k < K) part[((size_t)s * K + k) * M + m] = os[r][m];
  }
}
