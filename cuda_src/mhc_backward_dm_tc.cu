// dM[i, j] = sum over tokens b and columns c of dout[b, i, c] x[b, j, c] on tensor cores, for
// bfloat16 with n == NMAX in {16, 32} and C a multiple of CH: the GEMM [n, B C] x [B C, n] with
// dout's rows as the A operand and x's rows as the column-major B operand, products exact
// (bfloat16 x bfloat16) and float32 accumulation. mhc_backward_dm (CUDA cores, float32 tiles in
// shared memory) serves every other dtype and n: at n = 32 its two shared loads per FMA made it
// the slowest kernel of the backward.
// CTA g walks chunks (token b, CH columns) g, g + G, ... through STAGES cp.async stages; a chunk
// holds dout's and x's n rows x CH columns (row r's 16-byte segment s at s ^ (r & 7): ldmatrix
// reads 8 rows without bank conflicts). Warp w takes the chunk's k16 slice w: A fragments of
// dout by ldmatrix, B fragments of x by ldmatrix (x[j][c] is B[c][j] column-major), N/16 x N/8
// MMAs. At the end the warps' accumulators are summed in a fixed order: one partial [n * n] per
// CTA, which mhc_backward_reduce sums over CTAs in a fixed order (deterministic, no atomics).
// Launch: grid (G * DM_TC_THREADS, 1, 1), threadgroup (DM_TC_THREADS, 1, 1); shared: STAGES * 2 *
// n * CH bfloat16 (the warps' n * n sums reuse it), passed by cuda._dm_partials.
#include <cuda_pipeline.h>
#include <type_traits>

#include "mhc_dynamic_mma.cuh"  // mma.sync / ldmatrix wrappers (CUDA-only)

using namespace mhc;

constexpr int DM_TC_THREADS = 256, DM_TC_WARPS = DM_TC_THREADS / 32;
constexpr int CH = 16 * DM_TC_WARPS;  // columns per chunk: a k16 slice per warp
constexpr int STAGES = 4;
constexpr int CSEGS = CH / 8;  // 16-byte segments of a chunk row

extern "C" __global__ void __launch_bounds__(DM_TC_THREADS) MHC_NAME(const T* __restrict__ x,
                                                                      const T* __restrict__ dout,
                                                                      float* __restrict__ partial, int n, int C,
                                                                      int B) {
  static_assert(std::is_same_v<T, bf16> && (NMAX == 16 || NMAX == 32), "variants.py: bf16, n16 / n32 only");
  constexpr int N = NMAX, MT = N / 16, NT = N / 8;
  constexpr int STAGE_ELEMS = 2 * N * CH;                          // dout rows, then x rows
  constexpr int COPIES = STAGE_ELEMS / 8 / DM_TC_THREADS;          // 16-byte copies per thread a chunk
  static_assert(COPIES * DM_TC_THREADS * 8 == STAGE_ELEMS, "whole copies per thread");
  extern __shared__ float smem[];
  bf16* stages = reinterpret_cast<bf16*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int KB = C / CH;  // chunks per token
  const long chunks = (long)B * KB;
  const int G = gridDim.x;
  const int mine = chunks > blockIdx.x ? (int)((chunks - 1 - blockIdx.x) / G + 1) : 0;

  auto load = [&](int k) {  // this CTA's chunk k into stage k % STAGES (one commit group either way)
    if (k < mine) {
      const long ch = blockIdx.x + (long)k * G;
      const long b = ch / KB;
      const int c0 = (int)(ch % KB) * CH;
      bf16* st = stages + (k % STAGES) * STAGE_ELEMS;
#pragma unroll
      for (int u = 0; u < COPIES; ++u) {
        const int e = threadIdx.x + u * DM_TC_THREADS, r = e / CSEGS, s = e % CSEGS;  // r < 2N: dout, then x
        const T* src = (r < N ? dout : x) + ((size_t)b * N + (r % N)) * C + c0 + s * 8;
        __pipeline_memcpy_async(mma::swizzled_segment(st, CH, r, s), src, 16);
      }
    }
    __pipeline_commit();
  };

  float d[MT][NT][4] = {};
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) load(k);
  // ldmatrix rows of this lane: A (dout rows 16 mt + arow, k segment 2 w + aseg), B (x rows
  // 16 p + brow for n8 tiles 2p, 2p + 1, k segment 2 w + bseg)
  const int arow = (lane & 7) + 8 * ((lane >> 3) & 1), aseg = 2 * warp + (lane >> 4);
  const int brow = (lane & 7) + 8 * (lane >> 4), bseg = 2 * warp + ((lane >> 3) & 1);
  for (int k = 0; k < mine; ++k) {
    __pipeline_wait_prior(STAGES - 2);  // chunk k has landed (this thread's copies)
    __syncthreads();                    // ... every thread's; and stage (k - 1) % STAGES is no longer read
    load(k + STAGES - 1);
    bf16* st = stages + (k % STAGES) * STAGE_ELEMS;
    uint32_t a[MT][4], b[NT / 2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mma::ldmatrix_x4<false>(a[mt], mma::swizzled_segment(st, CH, 16 * mt + arow, aseg));
#pragma unroll
    for (int p = 0; p < NT / 2; ++p) mma::ldmatrix_x4<false>(b[p], mma::swizzled_segment(st, CH, N + 16 * p + brow, bseg));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma::bf16_16816(d[mt][nt], a[mt], b[nt / 2][2 * (nt % 2)], b[nt / 2][2 * (nt % 2) + 1]);
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // every warp is done with the stages: they hold the warps' sums now

  // warp w's n x n sums (C/D layout: rows 16 mt + g (+ 8), columns 8 nt + 2 q (+ 1)), then a fixed-order sum
  float* sums = smem;
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * mt + g + 8 * (e >> 1), j = 8 * nt + 2 * q + (e & 1);
        sums[warp * N * N + i * N + j] = d[mt][nt][e];
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < N * N; e += DM_TC_THREADS) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < DM_TC_WARPS; ++w) s += sums[w * N * N + e];
    partial[(size_t)blockIdx.x * N * N + e] = s;
  }
}
