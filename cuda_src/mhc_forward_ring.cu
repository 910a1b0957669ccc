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

// Sinkhorn (eq. 9) of the n x n logits in one warp, as scalings: M = diag(r) E diag(c) with
// E = exp(L - rowmax L); a row step r_i *= g(r_i (E c)_i), a column step c_j *= h(c_j (E^T r)_j),
// g / h: sk_recip with 1 / 0 past eps, as mhc_sinkhorn_fwd's steps on P (same eps rules, products
// taken in another order). Lane i holds row i of E and column i (E^T's row i), so each step is one
// matrix-vector product from registers: the other vector is read back from shared memory (8
// float4 broadcasts) after a __syncwarp, no shuffles. e / et arrive as L's row / column `lane`
// (lanes past n: -inf) and leave as E's. Ms[i * N + j] = M[i, j]; its first 2N floats carry c and r
// meanwhile. (Before, lane i scaled P's row i and took column sums by a transposing butterfly, 63
// shuffles a round: the kernel ran ~7 us faster without its Sinkhorn at (1024, 32, 2048), H200.
// Same-run A/B with the early loads below, median us: (1024, 32, 2048) 97.7 vs 107.3, (4096, 16,
// 1024) 101.5 vs 112.4. E's column in registers: 128 at n = 32, the cap at 512 threads, no spills.)
template <int N>
__device__ __forceinline__ float dot_broadcast(const float (&e)[N], const float* v) {
  float acc[4] = {};
#pragma unroll
  for (int k = 0; k < N / 4; ++k) {
    const float4 q = reinterpret_cast<const float4*>(v)[k];
    acc[0] = fmaf(e[4 * k], q.x, acc[0]);
    acc[1] = fmaf(e[4 * k + 1], q.y, acc[1]);
    acc[2] = fmaf(e[4 * k + 2], q.z, acc[2]);
    acc[3] = fmaf(e[4 * k + 3], q.w, acc[3]);
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <int N>
__device__ __forceinline__ void sinkhorn_warp(float (&e)[N], float (&et)[N], float* Ms, int iters, float eps, int lane) {
  const bool on = lane < N;
  float* cv = Ms;      // c, then (first) the row maxima
  float* rv = Ms + N;  // r
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < N; ++j) m = fmaxf(m, e[j]);
  if (on) cv[lane] = m;
  __syncwarp();
#pragma unroll
  for (int j = 0; j < N; ++j) {  // E[lane, j] and E[j, lane], the same expf of the same inputs
    e[j] = on ? expf(e[j] - m) : 0.0f;
    et[j] = on ? expf(et[j] - cv[j]) : 0.0f;
  }
  float r = 1.0f, c = 1.0f;  // r_lane, c_lane
  __syncwarp();
  if (on) cv[lane] = c;
  __syncwarp();
  for (int t = 0; t < iters; ++t) {
    r *= sk_recip(r * dot_broadcast<N>(e, cv), eps, 1.0f);  // row sums of P: r_i (E c)_i
    if (on) rv[lane] = r;
    __syncwarp();
    c *= sk_recip(c * dot_broadcast<N>(et, rv), eps, 0.0f);  // column sums: c_j (E^T r)_j
    if (on) cv[lane] = c;
    __syncwarp();
  }
  float cj[N];
#pragma unroll
  for (int j = 0; j < N; ++j) cj[j] = cv[j];
  __syncwarp();  // r and c are read: Ms may be overwritten
  if (on) {
#pragma unroll
    for (int j = 0; j < N; ++j) Ms[lane * N + j] = r * e[j] * cj[j];
  }
}

// Groups a warp streams as one unit (a slot of its ring): built for 1, 2 and 4 (variants.py
// RING_UNITS), the launcher taking the widest C allows (cuda.ring_units: C % (256 U) == 0). A lane's
// copies cover 32 U contiguous bytes of a row (a warp's copy touches 16 / U rows) and a unit's rows
// are stored 32 U bytes at a time. Why: with no output stores at all, U = 1 still took 98 us at
// (1024, 32, 2048) on the H200 (79 at U = 4): its 32-byte pieces, not the math, set its pace.
// Same-run A/B (scripts/gpu_source_ab.py, median us), U = 1 / 2 / 4: (1024, 32, 2048) 122.2 / 109.7
// / 105.9, (4096, 16, 1024) 136.7 / 123.1 / 113.4.
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
  // L and the activations' inputs are read before the ring's first copies: a global load issued
  // after them waits behind them (same-run A/B, H200, median us: (1024, 32, 2048) 103.6 vs 110.1,
  // (4096, 16, 1024) 109.1 vs 115.1)
  float e[N], et[N];  // warp 0: L's row and column `lane`, for sinkhorn_warp
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const bool on = warp == 0 && lane < N;
    e[j] = on ? L[lane * N + j] : -INFINITY;
    et[j] = on ? L[j * N + lane] : -INFINITY;
  }
  float hraw = 0.0f;  // threads 0 .. 2N - 1: H_pre_raw, then H_post_raw
  if (threadIdx.x < 2 * N) hraw = threadIdx.x < N ? H_pre_raw[threadIdx.x] : H_post_raw[threadIdx.x - N];
  issue();

  // while the first token lands: the activations, M (one warp), M's A fragments
  if (threadIdx.x < N) hpre[threadIdx.x] = sigmoid(hraw);
  else if (threadIdx.x < 2 * N) hpost[threadIdx.x - N] = 2.0f * sigmoid(hraw);
  if (warp == 0) sinkhorn_warp<N>(e, et, Ms, iters, eps, lane);
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
