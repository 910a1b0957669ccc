// Static mHC forward, strategy `ring` (CUDA, bfloat16, n == NMAX in {16, 32}, C % 256 == 0, a
// whole token in shared memory): one persistent CTA per SM walks its tokens b = blockIdx.x,
// blockIdx.x + gridDim.x, ... as one stream of 8 KB chunks (n rows x CH columns) through a ring of
// R chunk slots in shared memory. Each chunk is read from DRAM once, by cp.async, as far ahead as
// free slots allow, so the next token's loads run under this token's math and stores. No CTA talks
// to another (the `cluster` strategy's exchange needs thread block clusters, which MLX's CUDA graph
// cache mishandles), and the Sinkhorn runs here too, once per CTA (the `resident` strategy's way):
// one launch per forward.
//   M = sinkhorn(exp(L - rowmax L)) (eq. 9), bit-identical to mhc_sinkhorn_fwd's n <= 32 path
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]   (eq. 3)
// Pass 1 (per chunk as it lands, a warp per 16-column group): agg = hpre x on tensor cores, hpre
// as row 0 of an A tile split hi + lo (a butterfly over the rows cost 40 shuffles a thread a chunk,
// ~1 warp shuffle per SM clock: ~5.7 us a token at n = 32, more than half its DRAM time). Pass 2
// (steps of 256 columns, a warp per 16-column group): the mix on tensor cores as in
// mhc_forward_fused (M split hi + lo), results written over the consumed x and stored as whole
// 32-byte sectors; after each step its slots are refilled from the stream.
// Shared memory (floats): ring R * CHUNK_FLOATS, agg C, Ms N * N, Sinkhorn tile TILE + SMALL_N,
// hpre / hpost N each, 32 scratch. Within a slot, row j's 16-byte segment s sits at s ^ (j & 7).
// Launch: grid (G * RING_THREADS, 1, 1), G <= B CTAs (one per SM), threadgroup (RING_THREADS, 1, 1);
// R >= C / CH (a token's chunks) is passed by the launcher (cuda._ring_slots).
#include <cuda_pipeline.h>
#include <type_traits>

#include "mhc_dynamic_mma.cuh"  // mma.sync / ldmatrix wrappers, split_a_fragments (CUDA-only)
#include "mhc_sinkhorn_common.cuh"

using namespace mhc;

constexpr int RING_THREADS = 512, RING_WARPS = RING_THREADS / 32, SEG = 8;  // SEG: bfloat16 per 16 bytes
constexpr int CHUNK_BYTES = RING_THREADS * 16;                               // one 16-byte copy per thread
constexpr int CHUNK_FLOATS = CHUNK_BYTES / 4;
constexpr int STEP_COLS = 16 * RING_WARPS;                                   // pass 2: a 16-column group per warp

// Waits until at most `pending` of this thread's cp.async groups are in flight. The PTX wants an
// immediate: a chain down from P (a ring holds at most 27 chunks of a 227 KB GPU; more pending
// than P waits for P, which only waits longer). Exact, so pass 1 starts on chunk i as soon as it
// lands rather than when all but 7 of the stream's issued chunks have.
template <int P = 31>
__device__ __forceinline__ void wait_pending(int pending) {
  if constexpr (P == 0) {
    __pipeline_wait_prior(0);
  } else {
    if (pending >= P) {
      __pipeline_wait_prior(P);
    } else {
      wait_pending<P - 1>(pending);
    }
  }
}

// The n <= 32 Sinkhorn of mhc_sinkhorn_fwd with RING_WARPS warps: warp w keeps rows w, w + 16 of
// the 32 x 32 tile in registers (lane = column; zeros past n); sums as there (row: warp_sum;
// column: the transposed tile), so M has the same bits. Ms[i * N + j] = M[i, j].
template <int N>
__device__ __forceinline__ void sinkhorn_rows(const float* __restrict__ L, float* Ms, float* tile, float* col,
                                              int iters, float eps) {
  constexpr int ROWS = SMALL_N / RING_WARPS;  // all 32 rows of the tile, zeros past n (as there)
  const int w = threadIdx.x >> 5, j = threadIdx.x & 31;
  float p[ROWS];
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
    const int i = w + RING_WARPS * k;
    const bool ok = i < N && j < N;
    const float l = ok ? L[i * N + j] : -INFINITY;
    const float m = warp_max(l);
    p[k] = ok ? expf(l - m) : 0.0f;
  }
  for (int t = 0; t < iters; ++t) {
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      p[k] *= sk_recip(warp_sum(p[k]), eps, 1.0f);
      tile[j * (SMALL_N + 1) + w + RING_WARPS * k] = p[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {  // warp w sums columns w, w + 16
      const int c = w + RING_WARPS * k;
      const float s = warp_sum(tile[c * (SMALL_N + 1) + j]);
      if (j == 0) col[c] = s;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      const bool ok = w + RING_WARPS * k < N && j < N;
      p[k] = ok ? p[k] * sk_recip(col[j], eps, 0.0f) : 0.0f;
    }
  }
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
    const int i = w + RING_WARPS * k;
    if (i < N && j < N) Ms[i * N + j] = p[k];
  }
}

extern "C" __global__ void __launch_bounds__(RING_THREADS, 1) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ L, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, float* __restrict__ M, int n, int C, int B, int iters, float eps, int R) {
  static_assert(std::is_same_v<T, bf16> && (NMAX == 16 || NMAX == 32), "variants.py: bf16, n16 / n32 only");
  constexpr int N = NMAX, T16 = N / 16;
  constexpr int CH = CHUNK_BYTES / (2 * N);  // columns per chunk: 128 at n = 32, 256 at n = 16
  constexpr int CSEGS = CH / SEG;            // 16-byte segments per chunk row
  constexpr int CHUNKS_PER_STEP = STEP_COLS / CH;
  extern __shared__ float smem[];
  bf16* ring = reinterpret_cast<bf16*>(smem);
  float* agg = smem + R * CHUNK_FLOATS;
  float* Ms = agg + C;
  float* tile = Ms + N * N;  // the Sinkhorn's transposed tile
  float* col = tile + TILE;
  float* hpre = col + SMALL_N;
  float* hpost = hpre + N;
  float* scratch = hpost + N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, q = lane & 3;
  const int K = C / CH;  // chunks per token
  const int G = gridDim.x, mine = (B - (int)blockIdx.x + G - 1) / G;  // tokens of this CTA
  const int total = mine * K;                                          // chunks of its stream

  // the stream: chunk s is chunk s % K of this CTA's token s / K, in slot s % R
  int issued = 0, consumed = 0;
  auto slot_of = [&](int s) { return ring + (size_t)(s % R) * (CHUNK_BYTES / 2); };
  auto issue = [&]() {
    while (issued < total && issued - consumed < R) {
      const size_t b = blockIdx.x + (size_t)(issued / K) * G;
      const int i = issued % K, j = threadIdx.x / CSEGS, s = threadIdx.x % CSEGS;
      __pipeline_memcpy_async(mma::swizzled_segment(slot_of(issued), CH, j, s),
                              x + (b * N + j) * C + (size_t)i * CH + s * SEG, 16);
      __pipeline_commit();
      ++issued;
    }
  };
  issue();

  // while the first token lands: M, the activations, M's A fragments
  sinkhorn_rows<N>(L, Ms, tile, col, iters, eps);
  if (threadIdx.x < N) {
    hpre[threadIdx.x] = sigmoid(H_pre_raw[threadIdx.x]);
    hpost[threadIdx.x] = 2.0f * sigmoid(H_post_raw[threadIdx.x]);
  }
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int k = threadIdx.x; k < N * N; k += RING_THREADS) M[k] = Ms[k];
  }
  uint32_t a[2][T16][T16][4];
  mma::split_a_fragments<N, false>(Ms, a, lane);
  // hpre as row 0 of an A tile (the other rows zero), split hi + lo: pass 1's agg = hpre x
  uint32_t apre[2][1][T16][4];
  mma::split_a_tiles<1, T16>(apre, lane, [&](int row, int col, int u) { return row == 0 ? hpre[col + u] : 0.0f; });
  const int lrow = (lane & 7) + 8 * ((lane >> 3) & 1);  // this lane's ldmatrix row within a k16 tile

  for (int t = 0; t < mine; ++t) {
    const size_t b = blockIdx.x + (size_t)t * G;
    // pass 1, chunk by chunk as they land: agg = hpre x on tensor cores (row 0 of the A tile is
    // hpre, split hi + lo like M), a warp per 16-column group of the chunk; lanes 0-3 hold the
    // group's agg (columns 2q, 2q + 1 of each n8 tile) and add its squares to ss
    float ss = 0.0f;
    for (int i = 0; i < K; ++i) {
      const int sidx = t * K + i;
      wait_pending(issued - 1 - sidx);
      __syncthreads();  // every thread's copies of chunk sidx have landed
      bf16* slot = slot_of(sidx);
      for (int grp = warp; grp < CH / 16; grp += RING_WARPS) {
        float d[2][4] = {};
#pragma unroll
        for (int kt = 0; kt < T16; ++kt) {
          uint32_t bfr[4];
          mma::ldmatrix_x4<true>(bfr, mma::swizzled_segment(slot, CH, kt * 16 + lrow, 2 * grp + (lane >> 4)));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            mma::bf16_16816(d[nt], apre[1][0][kt], bfr[2 * nt], bfr[2 * nt + 1]);  // lo first
            mma::bf16_16816(d[nt], apre[0][0][kt], bfr[2 * nt], bfr[2 * nt + 1]);
          }
        }
        if (lane < 4) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int c = i * CH + 16 * grp + 8 * nt + 2 * lane;
            agg[c] = d[nt][0];
            agg[c + 1] = d[nt][1];
            ss = fmaf(d[nt][0], d[nt][0], ss);
            ss = fmaf(d[nt][1], d[nt][1], ss);
          }
        }
      }
    }
    const float r = rsqrtf(block_sum(ss, scratch) / C + eps);  // ends synchronised: agg is complete
    if (threadIdx.x == 0) inv_rms[b] = r;

    // pass 2, STEP_COLS columns a step: warp w takes 16-column group w of the step
    bf16* ob = out + b * N * C;
    for (int c0 = 16 * warp; c0 < C; c0 += STEP_COLS) {
      const int i = c0 / CH, seg0 = (c0 % CH) / SEG;  // its chunk, and its first segment there
      const int cl = c0 + 2 * q;  // this lane's first column of the group
      mma::mix_store_group<N>(
          a, slot_of(t * K + i), CH, seg0, hpost,
          [&](int nt) {
            const int c = cl + 8 * nt;
            return make_float2(agg[c] * r * __ldg(w + c), agg[c + 1] * r * __ldg(w + c + 1));
          },
          ob + c0, C, lane);
      // the step is done once every warp has stored its group: free its slots, refill from the stream
      __syncthreads();
      consumed += CHUNKS_PER_STEP;
      issue();
    }
  }
}
