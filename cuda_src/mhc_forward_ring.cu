// Static mHC forward, strategy `ring` (CUDA, bfloat16, n == NMAX in {16, 32}, C % 256 == 0, a
// whole token in shared memory): one persistent CTA per SM walks its tokens b = blockIdx.x,
// blockIdx.x + gridDim.x, ... Each warp owns every 16th 16-column group of a token (columns
// 16 (warp + 16 k)) and streams its groups, token after token, through its own ring of S group
// slots (N rows x 32 bytes each) by cp.async, as far ahead as its free slots allow: x is read from
// DRAM once, the next token's loads run under this token's math and stores, and a warp waits only
// for its own copies (a __syncwarp, no CTA barrier). The one CTA barrier a token is the RMS sum.
// (The first ring kernel streamed 8 KB chunks that every thread copied a piece of: 16 + 8 CTA
// barriers a token, half the warps idle in pass 1 at n = 32, 149 us at (1024, 32, 2048) on the
// H200, ncu.) No CTA talks to another (the `cluster` strategy's exchange needs thread block
// clusters, which MLX's CUDA graph cache mishandles), and the Sinkhorn runs here too, once per CTA
// in one warp (sinkhorn_warp): one launch per forward.
//   M = sinkhorn(exp(L - rowmax L)) (eq. 9), mhc_sinkhorn_fwd's arithmetic summed in another order
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]   (eq. 3)
// Pass 1 (per group as it lands): agg = hpre x on tensor cores, hpre split hi + lo as rows 0 and 8
// of one A tile (one MMA per n8 tile gives both terms; a butterfly over the rows cost 40 shuffles
// a thread a chunk). Pass 2: the mix on tensor cores as in mhc_forward_fused (M split hi + lo),
// results written over the consumed x and stored as whole 32-byte sectors; the slot is then
// refilled from the warp's stream. The passes run one after the other: pass 1 of token t + 1
// inside token t's pass 2 (a group after each store, agg * w in two halves) measured slower in a
// same-run A/B on the H200 (142.9 vs 139.5 us at (1024, 32, 2048), 173.2 vs 148.0 at (1024, 16,
// 4096)), and slower still with w loaded a group ahead (150.4, 184.2).
// Shared memory (floats): ring R * CHUNK_FLOATS (warp w's S slots at w S UNIT), agg * w C, Ms
// N * N, hpre / hpost N each, 64 scratch, w C. In a slot, row j's 16-byte segment s sits at
// unit_segment(j, s).
// Launch: grid (G * RING_THREADS, 1, 1), G <= B CTAs (one per SM), threadgroup (RING_THREADS, 1, 1);
// R >= a token's CHUNK_BYTES chunks is passed by the launcher (cuda._ring_slots): S = R CHUNK_BYTES
// / (RING_WARPS UNIT bytes) >= K = C / (256 U), a token's units per warp.
#include <cuda_pipeline.h>
#include <type_traits>

#include "mhc_dynamic_mma.cuh"  // mma.sync / ldmatrix wrappers, split_a_fragments (CUDA-only)
#include "mhc_sinkhorn_common.cuh"

using namespace mhc;

constexpr int RING_THREADS = 512, RING_WARPS = RING_THREADS / 32, SEG = 8;  // SEG: bfloat16 per 16 bytes
constexpr int CHUNK_BYTES = 8192;              // the launcher's unit of ring memory (cuda.RING_CHUNK_BYTES)
constexpr int CHUNK_FLOATS = CHUNK_BYTES / 4;
constexpr int STEP_COLS = 16 * RING_WARPS;     // a 16-column group per warp: a token's C / STEP_COLS per warp

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

// Groups a warp streams as one unit (a slot of its ring): built for 1, 2 and 4 (variants.py
// RING_UNITS), the launcher taking the widest C allows (cuda.ring_units: C % (256 U) == 0). A lane's
// copies cover 32 U contiguous bytes of a row (a warp's copy touches 16 / U rows) and a unit's rows
// are stored 32 U bytes at a time. Why: with no output stores at all, U = 1 still took 97-102 us at
// (1024, 32, 2048) on the H200 (79 at U = 4): its 32-byte pieces, not the math, set its pace.
// Same-run A/B (scripts/gpu_source_ab.py, median us), U = 1 / 2 / 4: (1024, 32, 2048) 122.2 / 109.7
// / 105.6, (4096, 16, 1024) 136.4 / 123.0 / 111.9. U = 4 at n = 32: 112 registers, no spills.
#ifndef MHC_RING_UNITS
#define MHC_RING_UNITS 1
#endif
constexpr int U = MHC_RING_UNITS, U_SHIFT = U == 1 ? 0 : U == 2 ? 1 : 2;  // log2 U
static_assert(U == 1 || U == 2 || U == 4, "MHC_RING_UNITS: 1, 2 or 4");

// Offset (bfloat16) of row j's 16-byte segment s (0 .. 2U - 1) in a unit slot (N rows x 16 U
// columns, 32 U bytes a row), stored at s ^ ((j >> (2 - log2 U)) & (2U - 1)): the eight rows of an
// ldmatrix phase (pitch 32 U bytes) then cover all 32 banks (for U = 1: s ^ bit 2 of j).
__device__ __forceinline__ int unit_segment(int j, int s) {
  return j * 16 * U + 8 * (s ^ ((j >> (2 - U_SHIFT)) & (2 * U - 1)));
}

extern "C" __global__ void __launch_bounds__(RING_THREADS, 1) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ L, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, float* __restrict__ M, int n, int C, int B, int iters, float eps, int R) {
  static_assert(std::is_same_v<T, bf16> && (NMAX == 16 || NMAX == 32), "variants.py: bf16, n16 / n32 only");
  constexpr int N = NMAX, T16 = N / 16;
  constexpr int UNIT = N * 16 * U;       // bfloat16 of a unit slot
  constexpr int COPIES = 2 * N * U / 32;  // 16-byte copies a lane a unit
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int S = R * (CHUNK_BYTES / 2) / (RING_WARPS * UNIT);  // this warp's slots
  bf16* ring = reinterpret_cast<bf16*>(smem) + (size_t)warp * S * UNIT;
  float* aggw = smem + R * CHUNK_FLOATS;  // agg[c] * w[c] of the current token (a warp's own columns)
  float* Ms = aggw + C;
  float* hpre = Ms + N * N;
  float* hpost = hpre + N;
  float* scratch = hpost + N;  // 64: block_sum_once
  float* ws = scratch + 64;    // w, read into shared memory once (see pass 1)
  for (int c = threadIdx.x; c < C; c += RING_THREADS) ws[c] = w[c];
  const int K = C / (STEP_COLS * U);  // a token's units per warp
  const int G = gridDim.x, mine = (B - (int)blockIdx.x + G - 1) / G;  // tokens of this CTA
  const int total = mine * K;                                          // units of this warp's stream

  // this warp's stream: item s is unit k = s % K (columns 16 U (warp + RING_WARPS k) on) of this
  // CTA's token s / K, in slot s % S. Counters move by one (no division in the loop). Lane copy u
  // takes row e / 2U, segment e % 2U of the unit, e = lane + 32 u.
  int issued = 0, consumed = 0, iss_k = 0, iss_slot = 0;
  size_t iss_tok = (size_t)blockIdx.x * N * C;  // element offset of the token being issued
  // (offsets kept per copy at U = 1; from U = 2 on, copy u is row j0 + u 16 / U of the same
  // segment, computed as it goes: 8 kept offsets spilled at U = 4, n = 32)
  constexpr int KEEP = U == 1 ? COPIES : 1;
  int soff[KEEP];
  size_t goff[KEEP];
#pragma unroll
  for (int u = 0; u < KEEP; ++u) {
    const int e = lane + 32 * u, j = e >> (1 + U_SHIFT), sg = e & (2 * U - 1);
    soff[u] = unit_segment(j, sg);
    goff[u] = (size_t)j * C + 16 * U * warp + SEG * sg;
  }
  auto issue = [&]() {
    while (issued < total && issued - consumed < S) {
      const T* src = x + iss_tok + (size_t)iss_k * STEP_COLS * U;
      bf16* dst = ring + iss_slot * UNIT;
#pragma unroll
      for (int u = 0; u < COPIES; ++u) {
        if constexpr (U == 1) {
          __pipeline_memcpy_async(dst + soff[u], src + goff[u], 16);
        } else {
          const int j = (lane >> (1 + U_SHIFT)) + u * (16 / U), sg = lane & (2 * U - 1);
          __pipeline_memcpy_async(dst + unit_segment(j, sg), src + goff[0] + (size_t)(u * (16 / U)) * C, 16);
        }
      }
      __pipeline_commit();
      ++issued;
      if (++iss_slot == S) iss_slot = 0;
      if (++iss_k == K) {
        iss_k = 0;
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
  // pass 1's A tiles: hpre's hi term in row 0, its lo term in row 8 (lanes 0-3 hold both rows);
  // split_a_tiles' hi / lo arithmetic written out (through it, the measured kernel's PTX changed)
  uint32_t apre[T16][4];
#pragma unroll
  for (int kt = 0; kt < T16; ++kt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = kt * 16 + 2 * q + 8 * (e >> 1);
      bf16 t[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const float v = hpre[col + u], hi = to_float(from_float<bf16>(v));
        t[u] = from_float<bf16>((e & 1) ? v - hi : v);  // a[1], a[3]: row g + 8
      }
      apre[kt][e] = g == 0 ? mma::pack_bf16(t[0], t[1]) : 0u;
    }
  float hp[T16][2];  // hpost of this lane's C/D rows 16 mt + g + 8 h
#pragma unroll
  for (int mt = 0; mt < T16; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) hp[mt][h] = hpost[16 * mt + g + 8 * h];
  const int lrow = (lane & 7) + 8 * ((lane >> 3) & 1);  // this lane's ldmatrix row within a k16 tile

  int slot0 = 0;  // slot of the current token's unit 0
  for (int t = 0; t < mine; ++t) {
    const size_t b = blockIdx.x + (size_t)t * G;
    auto slot = [&](int k) {  // slot of unit k of this token (k < K <= S)
      const int sl = slot0 + k;
      return ring + (sl >= S ? sl - S : sl) * UNIT;
    };
    // pass 1, group by group as they land: agg = hpre x; lanes 0-3 hold the group's agg (columns
    // 2q, 2q + 1 of each n8 tile: row 0 + row 8 of D), add its squares to ss and store agg * w.
    // w comes from shared memory: a global load here waited behind the ring's copies (7% of the
    // stall samples at (1024, 32, 2048), ncu; same-run A/B, median us: (1024, 32, 2048) 132.5 vs
    // 139.9, (1024, 16, 4096) 133.1 vs 146.8, (4096, 16, 1024) 138.1 vs 165.3), though it costs
    // the ring C floats
    float ss = 0.0f;
    for (int k = 0; k < K; ++k) {
      mma::wait_pending(issued - 1 - (t * K + k));
      __syncwarp();  // every lane's copies of the unit have landed
      bf16* sl = slot(k);
#pragma unroll 1
      for (int gi = 0; gi < U; ++gi) {  // the unit's 16-column groups (rolled: see pass 2)
        const int cq = 16 * U * (warp + RING_WARPS * k) + 16 * gi + 2 * q;  // lanes 0-3: columns cq, cq + 1 (+ 8)
        float d[2][4] = {};
#pragma unroll
        for (int kt = 0; kt < T16; ++kt) {
          uint32_t bfr[4];
          mma::ldmatrix_x4<true>(bfr, sl + unit_segment(kt * 16 + lrow, 2 * gi + (lane >> 4)));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) mma::bf16_16816(d[nt], apre[kt], bfr[2 * nt], bfr[2 * nt + 1]);
        }
        if (lane < 4) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const float g0 = d[nt][0] + d[nt][2], g1 = d[nt][1] + d[nt][3];
            const float2 wv = *reinterpret_cast<const float2*>(ws + cq + 8 * nt);
            *reinterpret_cast<float2*>(aggw + cq + 8 * nt) = make_float2(g0 * wv.x, g1 * wv.y);
            ss = fmaf(g0, g0, ss);
            ss = fmaf(g1, g1, ss);
          }
        }
      }
    }
    // the token's one CTA barrier; every warp's aggw is then complete (each reads only its own)
    const float r = rsqrtf(block_sum_once(ss, scratch, t & 1) / C + eps);
    if (threadIdx.x == 0) inv_rms[b] = r;

    // pass 2, this warp's units: mix (each group's results written over its x), store the unit's
    // rows, refill the slot from the stream
    bf16* ob = out + b * N * C;
    for (int k = 0; k < K; ++k) {
      const int c0 = 16 * U * (warp + RING_WARPS * k);
      bf16* sl = slot(k);
#pragma unroll 1
      for (int gi = 0; gi < U; ++gi) {  // rolled: four unrolled groups spilled at n = 32
        const int cl = c0 + 16 * gi + 2 * q;
        auto y = [&](int nt) {
          const float2 v = *reinterpret_cast<const float2*>(aggw + cl + 8 * nt);
          return make_float2(v.x * r, v.y * r);
        };
        mma::mix_back_rows<N>(a, [&](int j, int sg) { return sl + unit_segment(j, 2 * gi + sg); }, hp, y, lane);
      }
      __syncwarp();  // the unit's rows, 32 U bytes each: 2 U lanes a row
      mma::store_rows<N, 2 * U>([&](int j, int sg) { return sl + unit_segment(j, sg); }, ob + c0, C, lane);
      __syncwarp();  // every lane's shared reads of the slot are done: it may be refilled
      ++consumed;
      issue();
    }
    slot0 += K;
    if (slot0 >= S) slot0 -= S;
  }
}
