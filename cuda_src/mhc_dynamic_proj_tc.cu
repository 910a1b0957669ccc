// Forward projection on tensor cores, for bfloat16 x and M = n n + 2 n <= 32 (n <= 4):
//   part[s, t, m] = sum_{k in split s} x[t, k] phi[k, m],   sq[s, t] = sum_{k in split s} x[t, k]^2
// the same outputs as mhc_dynamic_skinny (which serves every other case). bfloat16 x is exact in
// the bfloat16 MMA; float32 phi is split as phi = hi + mid + lo (three bfloat16 terms, exact to
// 2^-24 relative), so three MMAs with float32 accumulation give a float32-accurate product.
// CTA: 128 tokens (8 warps x 16 rows) x 32 columns; K streams through shared memory KC at a time,
// double-buffered: stage s + 1's x tile and its phi rows are in flight (cp.async, 16 bytes per
// copy) while stage s's MMAs run, so the x stream never waits on a barrier-bound load-then-compute
// cycle (ncu, H100, T = 8192, K = 16384: the single-buffered version moved x at 22% of DRAM
// bandwidth). phi's rows of a stage are one contiguous block: each thread copies its own 16-byte
// chunks into a raw float buffer and splits exactly those into the stage's bfloat16 tiles, so the
// split needs no barrier and no registers across the MMAs (holding the next stage's phi in
// registers spilled at 80 registers: 1M local-memory requests per launch, ncu H100). Element
// loads when rows are not 16-byte aligned. The split over K (grid y) is chosen by the launcher so
// that every CTA is resident at once (no second, mostly idle wave). WMMA fragments are loaded from
// and stored to shared memory only.
// Grid (threads): (THREADS, S, ceil(T / 128)): token tiles are the slowest grid dimension, so the
// tokens read last are still in L2 when the coefficients kernel starts.
// Shared memory (dynamic): SMEM_BYTES, or SMEM_ONE_STAGE when ksplit <= KC. Needs sm_80+.
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
constexpr int XV = TB * KC / V / THREADS;       // x vectors per thread per stage
constexpr int RC = (KC * MP / 4 + THREADS - 1) / THREADS;  // raw phi chunks (4 floats) per thread per stage
constexpr int X_BYTES = TB * XLD * 2, P_BYTES = 3 * KC * PLD * 2, RAW_BYTES = KC * MP * 4;
static_assert(TB * OLD * 4 <= X_BYTES, "the output staging reuses an x buffer's bytes");
static_assert(X_BYTES % 32 == 0 && P_BYTES % 32 == 0, "WMMA tiles stay 32-byte aligned");
// [raw phi rows of the next stage][buffer 0: x tile, phi tiles][buffer 1: x tile, phi tiles].
// Two buffers: what the launcher passes (mhc_aot/cuda_dynamic.py TC_SMEM_BYTES; three CTAs fit an
// H100 SM); one when every CTA has a single stage (ksplit <= KC): buffer 0 only.
constexpr int SMEM_ONE_STAGE = RAW_BYTES + X_BYTES + P_BYTES;
constexpr int SMEM_BYTES = SMEM_ONE_STAGE + X_BYTES + P_BYTES;
static_assert(SMEM_BYTES == 75776 && SMEM_ONE_STAGE == 41984,
              "keep TC_SMEM_BYTES / TC_SMEM_ONE_STAGE in mhc_aot/cuda_dynamic.py equal");
}  // namespace

// three CTAs per SM (shared memory allows three): at most 85 registers per thread
extern "C" __global__ void __launch_bounds__(THREADS, 3) MHC_NAME(
    const bf16* __restrict__ x, const float* __restrict__ phi, float* __restrict__ part, float* __restrict__ sq,
    int Tn, int K, int M, int ksplit) {
  extern __shared__ float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  float* raw = smem;  // [KC rows x M floats], contiguous as in phi
  auto xs = [&](int buf) { return reinterpret_cast<bf16 (*)[XLD]>(base + RAW_BYTES + buf * (X_BYTES + P_BYTES)); };
  auto ps = [&](int buf, int p) {
    return reinterpret_cast<bf16 (*)[PLD]>(base + RAW_BYTES + buf * (X_BYTES + P_BYTES) + X_BYTES + p * (P_BYTES / 3));
  };
  const int tid = threadIdx.x, warp = tid / 32;
  const int s = blockIdx.y, t0 = blockIdx.z * TB;  // token tiles slowest: the last tokens read stay in L2
  const int k_begin = s * ksplit, k_end = min(K, k_begin + ksplit);
  const bool vec = K % V == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 && ksplit % V == 0;
  // k0 is a multiple of KC, so a stage's phi block starts 16-byte aligned when phi does
  const bool phi_vec = (reinterpret_cast<uintptr_t>(phi) & 15) == 0;

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
  // phi rows [k0, k0 + KC) n k_end: floats [0, count) of raw, chunk e = 4 floats, thread tid owns
  // chunks tid + i THREADS (the same ones every stage, so raw needs no barrier)
  auto stage_phi = [&](int k0) {
    const int count = min(KC, k_end - k0) * M;
    const float* src = phi + (size_t)k0 * M;
#pragma unroll
    for (int i = 0; i < RC; ++i) {
      const int f = 4 * (tid + i * THREADS);
      if (phi_vec && f + 4 <= count) {
        __pipeline_memcpy_async(raw + f, src + f, 16);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (f + q < count) raw[f + q] = src[f + q];
      }
    }
  };
  // this thread's chunks of raw, split into the bfloat16 tiles of buffer buf (rows past k_end and
  // columns past M keep the zeros written before the first stage, or finite phi values of an
  // earlier stage that multiply x's zero-filled columns)
  auto split_phi = [&](int k0, int buf) {
    const int count = min(KC, k_end - k0) * M;
#pragma unroll
    for (int i = 0; i < RC; ++i) {
      const int f0 = 4 * (tid + i * THREADS);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int f = f0 + q;
        if (f < count) {
          const int kk = f / M, m = f % M;
          dyn::split_bf16x3(raw[f], ps(buf, 0)[kk][m], ps(buf, 1)[kk][m], ps(buf, 2)[kk][m]);
        }
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  float sqa[XV] = {};

  if (k_begin < k_end) {
    const bool two = k_begin + KC < k_end;  // the launcher gave two buffers
    for (int e = tid; e < (two ? 2 : 1) * P_BYTES / 16; e += THREADS) {  // phi tiles' padding: zeros
      const int b = e / (P_BYTES / 16), o = e % (P_BYTES / 16);
      reinterpret_cast<uint4*>(ps(b, 0))[o] = make_uint4(0u, 0u, 0u, 0u);
    }
    __syncthreads();  // every zero is written before any thread's split lands on it
    stage_phi(k_begin);
    __pipeline_commit();
    stage_x(k_begin, 0);
    __pipeline_commit();
    __pipeline_wait_prior(1);  // this thread's phi chunks have landed
    split_phi(k_begin, 0);
  }
  for (int k0 = k_begin, it = 0; k0 < k_end; k0 += KC, ++it) {
    const int buf = it & 1, nk = k0 + KC;
    const bool next = nk < k_end;
    // groups in flight after these: (x of this stage), phi of the next, x of the next
    if (next) stage_phi(nk);  // raw was consumed by this thread's own split
    __pipeline_commit();
    if (next) stage_x(nk, buf ^ 1);  // buffer buf ^ 1 was released by the previous iteration's last barrier
    __pipeline_commit();
    __pipeline_wait_prior(2);  // this thread's x copies of stage `it` have landed
    __syncthreads();           // everyone's have, and phi tiles buf are split
    bf16 (*xb)[XLD] = xs(buf);
#pragma unroll
    for (int i = 0; i < XV; ++i) {  // sums of squares of this thread's own vectors (16-byte loads)
      const int e = tid + i * THREADS, r = e / (KC / V), c = (e % (KC / V)) * V;
      const uint4 u = *reinterpret_cast<const uint4*>(&xb[r][c]);
      const bf16* h = reinterpret_cast<const bf16*>(&u);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const float v = to_float(h[q]);
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
    if (next) {
      __pipeline_wait_prior(1);  // this thread's phi chunks of the next stage have landed
      split_phi(nk, buf ^ 1);    // tiles buf ^ 1 were last read before this iteration's first barrier
    }
    __syncthreads();  // x buffer buf is consumed: the next iteration refills it
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
  float (*os)[OLD] = reinterpret_cast<float (*)[OLD]>(xs(0));  // x buffer 0 (free after the last barrier)
  wmma::store_matrix_sync(&os[warp * 16][0], acc[0], OLD, wmma::mem_row_major);
  wmma::store_matrix_sync(&os[warp * 16][16], acc[1], OLD, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < TB * M; e += THREADS) {
    const int r = e / M, m = e % M, t = t0 + r;
    if (t < Tn) part[((size_t)s * Tn + t) * M + m] = os[r][m];
  }
}
