// Static mHC forward, strategy `ring` (CUDA, bfloat16, n == NMAX in {16, 32}, C % 256 == 0, a
// whole token in shared memory): one persistent CTA per SM walks its tokens b = blockIdx.x,
// blockIdx.x + gridDim.x, ... as one stream of 8 KB chunks (n rows x CH columns) through a ring of
// R chunk slots in shared memory. Each chunk is read from DRAM once, by cp.async, as far ahead as
// free slots allow, so the next token's loads run under this token's math and stores. No CTA talks
// to another (the `cluster` strategy's exchange needs thread block clusters, which MLX's CUDA graph
// cache mishandles), and the Sinkhorn runs here too, once per CTA in one warp (sinkhorn_warp):
// one launch per forward.
//   M = sinkhorn(exp(L - rowmax L)) (eq. 9), mhc_sinkhorn_fwd's arithmetic summed in another order
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]   (eq. 3)
// Pass 1 (per chunk as it lands, a warp per 16-column group): agg = hpre x on tensor cores, hpre
// as row 0 of an A tile split hi + lo (a butterfly over the rows cost 40 shuffles a thread a chunk,
// ~1 warp shuffle per SM clock: ~5.7 us a token at n = 32, more than half its DRAM time). Pass 2
// (steps of 256 columns, a warp per 16-column group): the mix on tensor cores as in
// mhc_forward_fused (M split hi + lo), results written over the consumed x and stored as whole
// 32-byte sectors; after each step its slots are refilled from the stream.
// Shared memory (floats): ring R * CHUNK_FLOATS, agg * w C, Ms N * N, hpre / hpost N each, 32
// scratch. Within a slot, row j's 16-byte segment s sits at s ^ (j & 7).
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

// The transposing butterfly of sinkhorn_warp: at offset H, lanes with bit H keep the upper half of
// the 2H live values and send the lower half (the partner the reverse); the H values left then sum
// lanes l and l ^ H. From H = N / 2 down to 1, lane l ends with column l's sum in v[0].
template <int N, int H>
__device__ __forceinline__ void column_sums(float (&v)[N], int lane) {
  const bool up = lane & H;
#pragma unroll
  for (int k = 0; k < H; ++k) {
    const float send = up ? v[k] : v[k + H], keep = up ? v[k + H] : v[k];
    v[k] = keep + __shfl_xor_sync(0xffffffffu, send, H);
  }
  if constexpr (H > 1) column_sums<N, H / 2>(v, lane);
}

// Sinkhorn (eq. 9) of the n x n logits L in one warp, lane i holding row i in registers (zeros past
// n), so no barrier a round: row sums are local; column sums come from a transposing butterfly
// (N - 1 shuffles leave column l's sum in lane l), whose reciprocals reach every lane by shuffles.
// Same arithmetic as mhc_sinkhorn_fwd (exp after the row max, sk_recip with 1 / 0 past eps), summed
// in another order. Ms[i * N + j] = M[i, j]. (The 16-warp version, two barriers a round, took
// ~11% of the kernel on the H200 at (1024, 32, 2048), ncu.)
template <int N>
__device__ __forceinline__ void sinkhorn_warp(const float* __restrict__ L, float* Ms, int iters, float eps, int lane) {
  const bool row = lane < N;
  float p[N], m = -INFINITY;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    p[j] = row ? L[lane * N + j] : -INFINITY;
    m = fmaxf(m, p[j]);
  }
#pragma unroll
  for (int j = 0; j < N; ++j) p[j] = row ? expf(p[j] - m) : 0.0f;
  for (int t = 0; t < iters; ++t) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < N; ++j) s += p[j];
    const float rr = sk_recip(s, eps, 1.0f);
    float v[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      p[j] *= rr;
      v[j] = p[j];
    }
    column_sums<N, N / 2>(v, lane);
    const float rc = sk_recip(v[0], eps, 0.0f);  // lane l < N: column l (lanes past N: zeros)
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] *= __shfl_sync(0xffffffffu, rc, j);
  }
  if (row) {
#pragma unroll
    for (int j = 0; j < N; ++j) Ms[lane * N + j] = p[j];
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
  static_assert(CH / 16 <= RING_WARPS, "pass 1: at most one 16-column group of a chunk per warp");
  extern __shared__ float smem[];
  bf16* ring = reinterpret_cast<bf16*>(smem);
  float* aggw = smem + R * CHUNK_FLOATS;  // agg[c] * w[c] of the current token
  float* Ms = aggw + C;
  float* hpre = Ms + N * N;
  float* hpost = hpre + N;
  float* scratch = hpost + N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, q = lane & 3;
  const int K = C / CH;  // chunks per token
  const int G = gridDim.x, mine = (B - (int)blockIdx.x + G - 1) / G;  // tokens of this CTA
  const int total = mine * K;                                          // chunks of its stream
  constexpr int SLOT_ELEMS = CHUNK_BYTES / 2;

  // the stream: chunk s is chunk s % K of this CTA's token s / K, in slot s % R. Counters move by
  // one (no division in the loops: R and K are not compile-time). This thread copies row j,
  // segment sg of every chunk.
  int issued = 0, consumed = 0, iss_i = 0, iss_slot = 0;
  size_t iss_tok = (size_t)blockIdx.x * N * C;  // element offset of the token being issued
  const int j_own = threadIdx.x / CSEGS, sg_own = threadIdx.x % CSEGS;
  const T* src_own = x + (size_t)j_own * C + sg_own * SEG;
  bf16* dst_own = mma::swizzled_segment(ring, CH, j_own, sg_own);
  auto issue = [&]() {
    while (issued < total && issued - consumed < R) {
      __pipeline_memcpy_async(dst_own + iss_slot * SLOT_ELEMS, src_own + iss_tok + (size_t)iss_i * CH, 16);
      __pipeline_commit();
      ++issued;
      if (++iss_slot == R) iss_slot = 0;
      if (++iss_i == K) {
        iss_i = 0;
        iss_tok += (size_t)G * N * C;
      }
    }
  };
  issue();

  // while the first token lands: M (one warp), the activations, M's A fragments
  if (warp == 0) sinkhorn_warp<N>(L, Ms, iters, eps, lane);
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

  int slot0 = 0;  // slot of the current token's chunk 0
  for (int t = 0; t < mine; ++t) {
    const size_t b = blockIdx.x + (size_t)t * G;
    auto slot = [&](int i) {  // slot of chunk i of this token (i < K <= R)
      const int sl = slot0 + i;
      return ring + (size_t)(sl >= R ? sl - R : sl) * SLOT_ELEMS;
    };
    // pass 1, chunk by chunk as they land: agg = hpre x on tensor cores (row 0 of the A tile is
    // hpre, split hi + lo like M), warp g < CH / 16 on the chunk's 16-column group g; lanes 0-3
    // hold the group's agg (columns 2q, 2q + 1 of each n8 tile), add its squares to ss and store
    // agg * w (w read before the chunk's wait, so its latency hides under it)
    float ss = 0.0f;
    for (int i = 0; i < K; ++i) {
      float2 wv[2] = {};
      const int cg = i * CH + 16 * warp + 2 * lane;  // lanes 0-3: columns cg, cg + 1 (+ 8)
      if (warp < CH / 16 && lane < 4) {
        wv[0] = __ldg(reinterpret_cast<const float2*>(w + cg));
        wv[1] = __ldg(reinterpret_cast<const float2*>(w + cg + 8));
      }
      mma::wait_pending(issued - 1 - (t * K + i));
      __syncthreads();  // every thread's copies of chunk i have landed
      if (warp < CH / 16) {
        const bf16* sl = slot(i);
        float d[2][4] = {};
#pragma unroll
        for (int kt = 0; kt < T16; ++kt) {
          uint32_t bfr[4];
          mma::ldmatrix_x4<true>(bfr, mma::swizzled_segment(const_cast<bf16*>(sl), CH, kt * 16 + lrow,
                                                            2 * warp + (lane >> 4)));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            mma::bf16_16816(d[nt], apre[1][0][kt], bfr[2 * nt], bfr[2 * nt + 1]);  // lo first
            mma::bf16_16816(d[nt], apre[0][0][kt], bfr[2 * nt], bfr[2 * nt + 1]);
          }
        }
        if (lane < 4) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            *reinterpret_cast<float2*>(aggw + cg + 8 * nt) = make_float2(d[nt][0] * wv[nt].x, d[nt][1] * wv[nt].y);
            ss = fmaf(d[nt][0], d[nt][0], ss);
            ss = fmaf(d[nt][1], d[nt][1], ss);
          }
        }
      }
    }
    const float r = rsqrtf(block_sum(ss, scratch) / C + eps);  // ends synchronised: aggw is complete
    if (threadIdx.x == 0) inv_rms[b] = r;

    // pass 2, STEP_COLS columns a step: warp w takes 16-column group w of the step
    bf16* ob = out + b * N * C;
    for (int c0 = 16 * warp; c0 < C; c0 += STEP_COLS) {
      const int i = c0 / CH, seg0 = (c0 % CH) / SEG;  // its chunk, and its first segment there
      const int cl = c0 + 2 * q;  // this lane's first column of the group
      mma::mix_store_group<N>(
          a, slot(i), CH, seg0, hpost,
          [&](int nt) {
            const float2 v = *reinterpret_cast<const float2*>(aggw + cl + 8 * nt);
            return make_float2(v.x * r, v.y * r);
          },
          ob + c0, C, lane);
      // the step is done once every warp has stored its group: free its slots, refill from the stream
      __syncthreads();
      consumed += CHUNKS_PER_STEP;
      issue();
    }
    slot0 += K;
    if (slot0 >= R) slot0 -= R;
  }
}
