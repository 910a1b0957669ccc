// Static mHC forward, strategy `fused`: one CTA per token, x read from DRAM once.
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
// Pass 1 streams x from DRAM and keeps agg (C floats) in shared memory; pass 2 re-reads the
// token, which this CTA has just pulled into L1/L2, and writes out. inv_rms is saved for the
// backward. Shared memory: Mt[n * pad] + hpre[pad] + hpost[pad] + agg[C] + 32 floats.
// Launch: grid (B * THREADS, 1, 1), threadgroup (THREADS, 1, 1).
// Tensor-core pass 2 (CUDA only; the Metal twin keeps the CUDA-core mix): bfloat16 x, n == NMAX in
// {16, 32}, C a multiple of TC_COLS and 16-byte rows. There the mix, n^2 multiply-adds per column,
// is what bounds the CUDA-core pass (ncu, H100, (1024, 32, 2048): 341 us, 25% of the copy roof);
// on mma.sync it is memory-bound again. M is split into two bfloat16 terms (hi + lo, 2^-17
// relative: far below the bfloat16 output's rounding), held as A fragments for the whole token;
// x arrives in TC_STAGES cp.async chunks of n x TC_COLS (a swizzled ring after agg, 16-byte
// aligned: cuda._fused_tc_ring_floats more shared floats, added by the launcher under the same
// condition) and is read by ldmatrix.trans as B fragments. Each warp owns 16 columns of a chunk.
#include <cuda_pipeline.h>
#include <type_traits>

#include "mhc_dynamic_mma.cuh"  // mma.sync / ldmatrix wrappers (CUDA-only, as the dynamic kernels)
#include "mhc_token_passes.cuh"

using namespace mhc;

constexpr int TC_COLS = 128, TC_STAGES = 4;
constexpr bool TC_VARIANT = std::is_same_v<T, bf16> && (NMAX == 16 || NMAX == 32);

// out[i, c] = sum_j M[i, j] x[j, c] + hpost[i] agg[c] r w[c] on tensor cores, n = N.
template <int N, typename E>  // E = bf16 (a template parameter only so that other dtypes never see the call)
__device__ __forceinline__ void mix_pass_tc(const E* __restrict__ xb, E* __restrict__ ob,
                                            const float* __restrict__ M, const float* hpost, const float* agg,
                                            const float* __restrict__ w, float r, int C, E* ring) {
  constexpr int T16 = N / 16;                  // m16 tiles of rows i, k16 tiles of streams j
  constexpr int SEGS = TC_COLS / 8;            // 16-byte segments per row of a chunk
  constexpr int CHUNK = N * TC_COLS;           // bfloat16 per stage
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, q = lane & 3;
  uint32_t a[2][T16][T16][4];  // [hi / lo][mt][kt]: M's A fragments (layout: mhc_dynamic_mma.cuh)
  mma::split_a_fragments<N>(M, a, lane);
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
  const int lseg = 2 * warp + (lane >> 4);  // this lane's ldmatrix segment: the warp's 2w | 2w + 1
  for (int it = 0; it < chunks; ++it) {
    __pipeline_wait_prior(TC_STAGES - 2);  // this thread's copies of chunk `it` have landed
    __syncthreads();                        // everyone's have; slot (it - 1) % TC_STAGES is free
    if (it + TC_STAGES - 1 < chunks) load(it + TC_STAGES - 1, (it + TC_STAGES - 1) % TC_STAGES);
    __pipeline_commit();
    const E* slot = ring + (it % TC_STAGES) * CHUNK;
    float d[T16][2][4];
    mma::mix_group16<N>(d, a, lane, [&](int j) { return slot + j * TC_COLS + ((lseg ^ (j & 7)) * 8); });
    const int c0 = it * TC_COLS + 16 * warp + 2 * q;  // this lane's first column of the warp's group
    mma::add_post_pairs<N>(
        d, hpost, lane,
        [&](int nt) {
          const int c = c0 + 8 * nt;
          return make_float2(agg[c] * r * w[c], agg[c + 1] * r * w[c + 1]);
        },
        [&](int i, int nt, uint32_t word) { *reinterpret_cast<uint32_t*>(ob + (size_t)i * C + c0 + 8 * nt) = word; });
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

// Small n needs few registers: ask for 5 CTAs per SM (6 spills) so one CTA's loads overlap
// another's math (ncu on the H100 at (4096, 4, 4096): 54 registers gave 4 CTAs/SM, 64% of DRAM).
constexpr int MIN_BLOCKS = (NMAX > 0 && NMAX <= 4) ? 5 : 2;

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ M, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, int n, int C, float eps) {
  extern __shared__ float smem[];
  const int pad = padded_streams(n);
  float* Mt = smem;
  float* hpre = Mt + n * pad;
  float* hpost = hpre + pad;
  float* scratch = hpost + pad;
  float* agg = scratch + 32;
  stage_params(M, H_pre_raw, H_post_raw, n, Mt, hpre, hpost);
  __syncthreads();
  const size_t b = blockIdx.x;
  const T* xb = x + b * n * C;
  T* ob = out + b * n * C;
  if (vec_ok<T>(C, x, out)) {
    forward_token<Vec<T>::N>(xb, ob, inv_rms + b, w, M, Mt, hpre, hpost, agg, scratch, n, C, eps);
  } else {
    forward_token<1>(xb, ob, inv_rms + b, w, M, Mt, hpre, hpost, agg, scratch, n, C, eps);
  }
}
