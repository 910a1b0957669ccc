// Static mHC forward, strategy `fused`: one CTA per token, x read from DRAM once.
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
// Pass 1 streams x from DRAM and keeps agg (C floats) in shared memory; pass 2 re-reads the
// token, which this CTA has just pulled into L1/L2, and writes out. inv_rms is saved for the
// backward. Shared memory: Mt[n * pad] + hpre[pad] + hpost[pad] + 32 floats + agg[C] (staged:
// 4 floats of alignment + two tokens of n x C in place of agg).
// Launch: grid (G * THREADS, 1, 1), threadgroup (THREADS, 1, 1); CTA k serves tokens k, k + G, ...
// (G = B, one token per CTA, except on the staged path below).
// Tensor-core pass 2 (CUDA only; the Metal twin keeps the CUDA-core mix): bfloat16 x, n == NMAX in
// {16, 32}, C a multiple of TC_COLS and 16-byte rows. There the mix, n^2 multiply-adds per column,
// is what bounds the CUDA-core pass (ncu, H100, (1024, 32, 2048): 341 us, 25% of the copy roof);
// on mma.sync it is memory-bound again. M is split into two bfloat16 terms (hi + lo, 2^-17
// relative: far below the bfloat16 output's rounding), held as A fragments for the whole token;
// x arrives in TC_STAGES cp.async chunks of n x TC_COLS (a swizzled ring after agg, 16-byte
// aligned: cuda._fused_tc_ring_floats more shared floats, added by the launcher under the same
// condition) and is read by ldmatrix.trans as B fragments. Each warp owns 16 columns of a chunk.
// Staged small-n path (CUDA only: cp.async; scalar `staged` = 1, set by cuda._fused_stage_floats
// for 0 < n <= NMAX <= STAGE_NMAX and two tokens within its shared-memory cap): a persistent grid
// (as many CTAs as stay resident; CTA k takes tokens k, k + gridDim.x, ...) copies each CTA's next
// token into the second of two shared-memory buffers by cp.async while it computes the current
// one, so DRAM reads never wait on the RMS barrier, and both passes read the token from shared
// memory instead of pass 2 re-reading it through L1/L2 (the one-CTA-per-token kernel: 119 us at
// 64% of DRAM peak at (4096, 4, 4096), ncu, H100). A thread copies and reads only its own 16-byte
// vectors (the same ones in both passes: nib = 1 for n <= 8), so the copies need no barrier; agg is
// recomputed in pass 2 by the same code in the same order (same bits as pass 1), not stored. The
// buffers start at the first 16-byte boundary after scratch; a staged launch whose pointers turn
// out unaligned takes the per-token path with agg in the buffers (2 n C sizeof(T) >= 4 C bytes).
#include <cuda_pipeline.h>
#include <type_traits>

#include "mhc_dynamic_mma.cuh"  // mma.sync / ldmatrix wrappers (CUDA-only, as the dynamic kernels)
#include "mhc_token_passes.cuh"

using namespace mhc;

constexpr int TC_COLS = 128, TC_STAGES = 4;
constexpr bool TC_VARIANT = std::is_same_v<T, bf16> && (NMAX == 16 || NMAX == 32);
constexpr int STAGE_NMAX = 8;
constexpr bool STAGE_VARIANT = NMAX > 0 && NMAX <= STAGE_NMAX;

// out[i, c] = sum_j M[i, j] x[j, c] + hpost[i] agg[c] r w[c] on tensor cores, n = N.
template <int N, typename E>  // E = bf16 (a template parameter only so that other dtypes never see the call)
__device__ __forceinline__ void mix_pass_tc(const E* __restrict__ xb, E* __restrict__ ob,
                                            const float* __restrict__ M, const float* hpost, const float* agg,
                                            const float* __restrict__ w, float r, int C, E* ring) {
  constexpr int T16 = N / 16;                  // m16 tiles of rows i, k16 tiles of streams j
  constexpr int SEGS = TC_COLS / 8;            // 16-byte segments per row of a chunk
  constexpr int CHUNK = N * TC_COLS;           // bfloat16 per stage
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  uint32_t a[2][T16][T16][4];  // [hi / lo][mt][kt]: M's A fragments (layout: mhc_dynamic_mma.cuh)
#pragma unroll
  for (int mt = 0; mt < T16; ++mt)
#pragma unroll
    for (int kt = 0; kt < T16; ++kt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = mt * 16 + g + 8 * (e & 1), col = kt * 16 + 2 * q + 8 * (e >> 1);
        bf16 h[2], l[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const float v = __ldg(M + row * N + col + u);
          h[u] = from_float<bf16>(v);
          l[u] = from_float<bf16>(v - to_float(h[u]));
        }
        a[0][mt][kt][e] = mma::pack_bf16(h[0], h[1]);
        a[1][mt][kt][e] = mma::pack_bf16(l[0], l[1]);
      }
  // chunk `ch` into ring slot `slot`: row j's segment s lands at segment s ^ (j & 7), so the eight
  // rows one ldmatrix phase reads sit in eight different bank groups
  auto load = [&](int ch, int slot) {
    E* dst = ring + slot * CHUNK;
    const E* src = xb + (size_t)ch * TC_COLS;
    for (int e = threadIdx.x; e < N * SEGS; e += THREADS) {
      const int j = e / SEGS, seg = e % SEGS;
      __pipeline_memcpy_async(dst + j * TC_COLS + ((seg ^ (j & 7)) * 8), src + (size_t)j * C + seg * 8, 16);
    }
  };
  const int chunks = C / TC_COLS;
#pragma unroll
  for (int st = 0; st < TC_STAGES - 1; ++st) {
    if (st < chunks) load(st, st);
    __pipeline_commit();
  }
  // this lane's ldmatrix row: matrices (k rows 0-7 | 8-15) x (the warp's segment 2w | 2w + 1)
  const int lrow = (lane & 7) + 8 * ((lane >> 3) & 1), lseg = 2 * warp + (lane >> 4);
  for (int it = 0; it < chunks; ++it) {
    __pipeline_wait_prior(TC_STAGES - 2);  // this thread's copies of chunk `it` have landed
    __syncthreads();                        // everyone's have; slot (it - 1) % TC_STAGES is free
    if (it + TC_STAGES - 1 < chunks) load(it + TC_STAGES - 1, (it + TC_STAGES - 1) % TC_STAGES);
    __pipeline_commit();
    const E* slot = ring + (it % TC_STAGES) * CHUNK;
    float d[T16][2][4] = {};
#pragma unroll
    for (int kt = 0; kt < T16; ++kt) {
      const int j = kt * 16 + lrow;
      uint32_t b[4];  // {b0, b1} of the warp's first n8 tile, then of its second
      mma::ldmatrix_x4<true>(b, slot + j * TC_COLS + ((lseg ^ (j & 7)) * 8));
#pragma unroll
      for (int mt = 0; mt < T16; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          mma::bf16_16816(d[mt][nt], a[1][mt][kt], b[2 * nt], b[2 * nt + 1]);  // lo first
          mma::bf16_16816(d[mt][nt], a[0][mt][kt], b[2 * nt], b[2 * nt + 1]);
        }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int c = it * TC_COLS + 16 * warp + 8 * nt + 2 * q;
      const float y0 = agg[c] * r * w[c], y1 = agg[c + 1] * r * w[c + 1];
#pragma unroll
      for (int mt = 0; mt < T16; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = mt * 16 + g + 8 * h;
          const float hp = hpost[i];
          *reinterpret_cast<uint32_t*>(ob + (size_t)i * C + c) = mma::pack_bf16(
              from_float<bf16>(d[mt][nt][2 * h] + hp * y0), from_float<bf16>(d[mt][nt][2 * h + 1] + hp * y1));
        }
    }
  }
}

template <int W>
__device__ __forceinline__ void forward_token(const T* xb, T* ob, float* inv_rms, const float* w, const float* Mg,
                                              const float* Mt,
                                              const float* hpre, const float* hpost, float* agg, float* scratch,
                                              int n, int C, float eps) {
  const float ss = block_sum(aggregate_pass<T, W>(xb, hpre, n, C, 0, C, agg), scratch);
  const float r = rsqrtf(ss / C + eps);
  if (threadIdx.x == 0) *inv_rms = r;
  if constexpr (TC_VARIANT && W > 1) {
    if (n == NMAX && C % TC_COLS == 0) {
      // the ring starts at the first 16-byte boundary after agg (see the header)
      const uintptr_t end = reinterpret_cast<uintptr_t>(agg + C);
      mix_pass_tc<NMAX>(xb, ob, Mg, hpost, agg, w, r, C, reinterpret_cast<T*>((end + 15) & ~uintptr_t(15)));
      return;
    }
  }
  mix_pass<T, W>(xb, ob, Mt, n, C, 0, C, [&](int i0, int c, float (&acc)[IB][W]) {
    float y[W];
#pragma unroll
    for (int e = 0; e < W; ++e) y[e] = agg[c + e] * r * w[c + e];
#pragma unroll
    for (int q = 0; q < IB; ++q) {
#pragma unroll
      for (int e = 0; e < W; ++e) acc[q][e] = hpost[i0 + q] * y[e];
    }
  });
}

// Staged path: cp.async of this thread's 16-byte vectors of token xb (all n rows) into buf, one
// commit group per token. (Templates, NS = NMAX, so that other variants never instantiate them.)
template <int NS>
__device__ __forceinline__ void stage_token(const T* __restrict__ xb, T* buf, int n, int C) {
  constexpr int W = Vec<T>::N;
  for (int c = threadIdx.x * W; c < C; c += THREADS * W) {
    for_streams<NS>(n, [&](int j) { __pipeline_memcpy_async(buf + j * C + c, xb + (size_t)j * C + c, 16); });
  }
  __pipeline_commit();
}

// Staged path: both passes over the token in shared memory (tok), out written to global ob.
// Pass 2 takes a work item's n vectors into registers once (packed) and, half a vector at a time
// (fewer live floats under MIN_BLOCKS' register cap), recomputes agg as pass 1 does (streams in
// order) and mixes each row as mix_pass does (init hpost[i] agg r w, then streams in order).
template <int NS>
__device__ __forceinline__ void forward_staged(const T* tok, T* ob, float* inv_rms, const float* w, const float* Mt,
                                               const float* hpre, const float* hpost, float* scratch, int n, int C,
                                               float eps) {
  constexpr int W = Vec<T>::N, H = W / 2;
  const int pad = padded_streams(n);
  const float ss = block_sum(aggregate_pass<T, W, true>(tok, hpre, n, C, 0, C, nullptr), scratch);
  const float r = rsqrtf(ss / C + eps);
  if (threadIdx.x == 0) *inv_rms = r;
  for (int c = threadIdx.x * W; c < C; c += THREADS * W) {
    uint4 raw[NS];
    for_streams<NS>(n, [&](int j) { raw[j] = *reinterpret_cast<const uint4*>(tok + (size_t)j * C + c); });
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      auto xs = [&](int j, int e) { return to_float(reinterpret_cast<const T*>(&raw[j])[h * H + e]); };
      float y[H] = {};
      for_streams<NS>(n, [&](int j) {
#pragma unroll
        for (int e = 0; e < H; ++e) y[e] = fmaf(hpre[j], xs(j, e), y[e]);
      });
#pragma unroll
      for (int e = 0; e < H; ++e) y[e] = y[e] * r * w[c + h * H + e];
      for_streams<NS>(n, [&](int i) {
        float acc[H];
#pragma unroll
        for (int e = 0; e < H; ++e) acc[e] = hpost[i] * y[e];
        for_streams<NS>(n, [&](int j) {
#pragma unroll
          for (int e = 0; e < H; ++e) acc[e] = fmaf(Mt[j * pad + i], xs(j, e), acc[e]);
        });
        uint2 packed;  // H elements = 8 bytes
#pragma unroll
        for (int e = 0; e < H; ++e) reinterpret_cast<T*>(&packed)[e] = from_float<T>(acc[e]);
        *reinterpret_cast<uint2*>(ob + (size_t)i * C + c + h * H) = packed;
      });
    }
  }
}

// Small n needs few registers: four CTAs per SM (64 registers, no spills; five left the staged
// path 124 bytes of spills at 48) so one CTA's loads overlap another's math. The staged path's
// shared memory keeps three per SM anyway; the per-token path (tokens over the staged cap) had
// 64% of DRAM peak at four (ncu, H100, (4096, 4, 4096), 54 registers, before the staged path).
constexpr int MIN_BLOCKS = (NMAX > 0 && NMAX <= 4) ? 4 : 2;

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ M, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, int n, int C, float eps, int B, int staged) {
  extern __shared__ float smem[];
  const int pad = padded_streams(n);
  float* Mt = smem;
  float* hpre = Mt + n * pad;
  float* hpost = hpre + pad;
  float* scratch = hpost + pad;
  float* agg = scratch + 32;
  stage_params(M, H_pre_raw, H_post_raw, n, Mt, hpre, hpost);
  __syncthreads();
  const size_t token = (size_t)n * C;
  const bool vec = vec_ok<T>(C, x, out);
  if constexpr (STAGE_VARIANT) {
    if (staged) {
      T* buf = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(agg) + 15) & ~uintptr_t(15));
      if (vec) {
        size_t b = blockIdx.x;
        if (b < (size_t)B) stage_token<NMAX>(x + b * token, buf, n, C);
        for (int k = 0; b < (size_t)B; b += gridDim.x, ++k) {
          const size_t next = b + gridDim.x;
          if (next < (size_t)B) {
            stage_token<NMAX>(x + next * token, buf + ((k + 1) & 1) * token, n, C);
          } else {
            __pipeline_commit();  // an empty group keeps "all but the newest group" meaning token b
          }
          __pipeline_wait_prior(1);  // this thread's copies of token b have landed
          forward_staged<NMAX>(buf + (k & 1) * token, out + b * token, inv_rms + b, w, Mt, hpre, hpost, scratch, n, C, eps);
        }
        return;
      }
      agg = reinterpret_cast<float*>(buf);  // the per-token path below, agg in the token buffers
    }
  }
  for (size_t b = blockIdx.x; b < (size_t)B; b += gridDim.x) {
    const T* xb = x + b * token;
    T* ob = out + b * token;
    if (vec) {
      forward_token<Vec<T>::N>(xb, ob, inv_rms + b, w, M, Mt, hpre, hpost, agg, scratch, n, C, eps);
    } else {
      forward_token<1>(xb, ob, inv_rms + b, w, M, Mt, hpre, hpost, agg, scratch, n, C, eps);
    }
  }
}
