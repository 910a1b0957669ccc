// Forward projection on tensor cores, for bfloat16 x and M = n n + 2 n <= 32 (n <= 4):
//   part[s, t, m] = sum_{k in split s} x[t, k] phi[k, m],   sq[s, t] = sum_{k in split s} x[t, k]^2
// the same outputs as mhc_dynamic_skinny (which serves every other case). bfloat16 x is exact in
// the bfloat16 MMA; float32 phi is split as phi = hi + mid + lo (three bfloat16 terms, exact to
// 2^-24 relative), so three MMAs with float32 accumulation give a float32-accurate product.
// CTA: 128 tokens (8 warps x 16 rows) x 32 columns; K streams through shared memory KC at a time,
// double-buffered: stage s + 1's x tile is in flight (cp.async, 16 bytes per copy) and its phi
// values in registers while stage s's MMAs run, so the x stream never waits on a barrier-bound
// load-then-compute cycle (ncu, H100, T = 8192, K = 16384: the single-buffered version moved x at
// 22% of DRAM bandwidth). Element loads when x's rows are not 16-byte aligned. The split over K
// (grid y) is chosen by the launcher so that every CTA is resident at once (no second, mostly
// idle wave). WMMA fragments are loaded from and stored to shared memory only.
// Grid (threads): (THREADS, S, ceil(T / 128)): token tiles are the slowest grid dimension, so the
// tokens read last are still in L2 when the coefficients kernel starts.
// Shared memory (dynamic): SMEM_BYTES, or half of it when ksplit <= KC. Needs sm_80+.
#include <cuda_pipeline.h>
#include <mma.h>

#include "mhc_dynamic_common.cuh"

using namespace mhc;
using namespace nvcuda;

namespace {
constexpr int TB = 128, MP = 32, KC = 64;
constexpr int V = 8;          // bf16 per 16-byte vector
constexpr int XLD = KC + 8;   // bf16 elements per x row in shared memory (rows 16-byte aligned, tiles 32-byte)
constexpr int PLD = MP + 8;   // bf16 elements per phi row
constexpr int OLD = MP + 4;   // floats per output row
constexpr int XV = TB * KC / V / THREADS;  // x vectors per thread per stage
constexpr int PE = KC * MP / THREADS;      // phi values per thread per stage
constexpr int X_BYTES = TB * XLD * 2, P_BYTES = 3 * KC * PLD * 2;
static_assert(TB * OLD * 4 <= X_BYTES, "the output staging reuses an x buffer's bytes");
static_assert(X_BYTES % 32 == 0 && P_BYTES % 32 == 0, "WMMA tiles stay 32-byte aligned");
// Buffer b = (x tile, phi tiles) at b * (X_BYTES + P_BYTES). Two buffers: what the launcher passes
// (mhc_aot/cuda_dynamic.py TC_SMEM_BYTES); one when every CTA has a single stage (ksplit <= KC),
// which uses buffer 0 only: half the shared memory, twice the resident CTAs.
constexpr int SMEM_BYTES = 2 * (X_BYTES + P_BYTES);
static_assert(SMEM_BYTES == 67584, "keep TC_SMEM_BYTES in mhc_aot/cuda_dynamic.py equal");
}  // namespace

// three CTAs per SM (shared memory allows three): at most 85 registers per thread
extern "C" __global__ void __launch_bounds__(THREADS, 3) MHC_NAME(
    const bf16* __restrict__ x, const float* __restrict__ phi, float* __restrict__ part, float* __restrict__ sq,
    int Tn, int K, int M, int ksplit) {
  extern __shared__ float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  auto xs = [&](int buf) { return reinterpret_cast<bf16 (*)[XLD]>(base + buf * (X_BYTES + P_BYTES)); };
  auto ps = [&](int buf, int p) {
    return reinterpret_cast<bf16 (*)[PLD]>(base + buf * (X_BYTES + P_BYTES) + X_BYTES + p * (P_BYTES / 3));
  };
  const int tid = threadIdx.x, warp = tid / 32;
  const int s = blockIdx.y, t0 = blockIdx.z * TB;  // token tiles slowest: the last tokens read stay in L2
  const int k_begin = s * ksplit, k_end = min(K, k_begin + ksplit);
  const bool vec = K % V == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 && ksplit % V == 0;

  // x tile of stage k0 into buffer buf: thread tid copies rows tid / 8 + 32 i, a fixed set
  auto stage_x = [&](int k0, int buf) {
    bf16 (*dst)[XLD] = xs(buf);
#pragma unroll
    for (int i = 0; i < XV; ++i) {
      const int e = tid + i * THREADS, r = e / (KC / V), c = (e % (KC / V)) * V;
      const int t = t0 + r, k = k0 + c;
      if (vec && t < Tn && k + V <= k_end) {
        __pipeline_memcpy_async(&dst[r][c], x + (size_t)t * K + k, 16);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q)
          dst[r][c + q] = (t < Tn && k + q < k_end) ? x[(size_t)t * K + k + q] : from_float<bf16>(0.0f);
      }
    }
  };
  auto load_phi = [&](int k0, float (&pr)[PE]) {
#pragma unroll
    for (int i = 0; i < PE; ++i) {
      const int e = tid + i * THREADS, kk = e / MP, m = e % MP, k = k0 + kk;
      pr[i] = (k < k_end && m < M) ? phi[(size_t)k * M + m] : 0.0f;
    }
  };
  auto store_phi = [&](const float (&pr)[PE], int buf) {
#pragma unroll
    for (int i = 0; i < PE; ++i) {
      const int e = tid + i * THREADS, kk = e / MP, m = e % MP;
      dyn::split_bf16x3(pr[i], ps(buf, 0)[kk][m], ps(buf, 1)[kk][m], ps(buf, 2)[kk][m]);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  float sqa[XV] = {};
  float pr[PE];

  if (k_begin < k_end) {
    stage_x(k_begin, 0);
    __pipeline_commit();
    load_phi(k_begin, pr);
    store_phi(pr, 0);
  }
  for (int k0 = k_begin, it = 0; k0 < k_end; k0 += KC, ++it) {
    const int buf = it & 1, nk = k0 + KC;
    const bool next = nk < k_end;
    if (next) stage_x(nk, buf ^ 1);  // buffer buf ^ 1 was released by the previous iteration's last barrier
    __pipeline_commit();
    if (next) load_phi(nk, pr);
    __pipeline_wait_prior(1);  // this thread's copies of stage `it` have landed
    __syncthreads();           // everyone's have, and phi buffer buf is written
    bf16 (*xb)[XLD] = xs(buf);
#pragma unroll
    for (int i = 0; i < XV; ++i) {  // sums of squares of this thread's own vectors
      const int e = tid + i * THREADS, r = e / (KC / V), c = (e % (KC / V)) * V;
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const float v = to_float(xb[r][c + q]);
        sqa[i] += v * v;
      }
    }
#pragma unroll
    for (int kk = 0; kk < KC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
      wmma::load_matrix_sync(a, &xb[warp * 16][kk], XLD);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
        for (int p = 0; p < 3; ++p) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
          wmma::load_matrix_sync(b, &ps(buf, p)[kk][nb * 16], PLD);
          wmma::mma_sync(acc[nb], a, b, acc[nb]);
        }
      }
    }
    if (next) store_phi(pr, buf ^ 1);
    __syncthreads();  // buffers buf are consumed: the next iteration refills them
  }
  // sums of squares: the 8 threads of a row are 8 consecutive lanes
#pragma unroll
  for (int i = 0; i < XV; ++i) {
    float v = sqa[i];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    const int r = (tid + i * THREADS) / (KC / V), t = t0 + r;
    if (tid % (KC / V) == 0 && t < Tn) sq[(size_t)s * Tn + t] = v;
  }
  float (*os)[OLD] = reinterpret_cast<float (*)[OLD]>(base);  // x buffer 0 (free after the last barrier)
  wmma::store_matrix_sync(&os[warp * 16][0], acc[0], OLD, wmma::mem_row_major);
  wmma::store_matrix_sync(&os[warp * 16][16], acc[1], OLD, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < TB * M; e += THREADS) {
    const int r = e / M, m = e % M, t = t0 + r;
    if (t < Tn) part[((size_t)s * Tn + t) * M + m] = os[r][m];
  }
}
