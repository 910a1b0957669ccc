// Static mHC backward, strategy `ring` (CUDA, bfloat16, n == NMAX in {16, 32}, C % 256 == 0, a
// token's dout in shared memory): one persistent CTA per SM walks its tokens b = blockIdx.x,
// blockIdx.x + gridDim.x, ... as a stream of chunk pairs (x and dout, n rows x CH columns each),
// read from DRAM once by cp.async into two rings: x chunks live until pass A has used them, dout
// chunks until pass B has. x, dout and dx each cross DRAM once, and dM, dH_pre, dH_post and dw
// come out of the same pass (mhc_backward_fused re-reads x and dout through L2 in its pass B and
// needs mhc_backward_dm for dM: at (1024, 32, 2048) on the H200, 576 + 64 us at 24% of DRAM peak).
// With y = agg r w, g = dy w, k = r^3 (sum_c g agg) / C (RMSNorm's backward, as mhc_backward_fused):
//   pass A, per chunk pair as it lands (warp w on 16-column group w, tensor cores, float32 sums):
//     agg = hpre x, dy = hpost dout (hpre / hpost as row 0 of a split A tile, as mhc_forward_ring)
//     dH_post[i] += sum_c dout[i, c] y[c]      (A = dout rows, B = y as a split column)
//     u[j] += sum_c x[j, c] r g[c],  v[j] += sum_c x[j, c] agg[c]   (A = x rows, B = [r g | agg])
//     dM[i, j] += sum_c dout[i, c] x[j, c]     (A = dout rows, B = x rows)
//     dw[c] += dy agg r; agg and g kept for pass B; the dot sum_c g agg
//   then dH_pre[j] += u[j] - k v[j] (= sum_c dagg[c] x[j, c], dagg = r g - k agg: x is not needed again)
//   pass B, steps of STEP_COLS columns (warp w on group w of the step): dx = M^T dout + hpre dagg on
//     tensor cores (mhc_dynamic_mma.cuh's mix_store_group with M^T), dx stored as whole sectors;
//     each step's dout slots are refilled from the stream.
// dM, u, v and dH_post sit in each warp's MMA accumulators across all its tokens; the CTA's sums go
// to partial[blockIdx.x] = [dM (n*n) | dH_pre (n) | dH_post (n) | dw (C)] (activations' derivatives
// not applied), which mhc_backward_reduce sums over CTAs in a fixed order: deterministic.
// Shared memory (floats): dout ring RD * CHUNK_FLOATS, x ring RX * CHUNK_FLOATS, agg C, g C, dw C,
// M^T N * N, hpre / hpost N each, 32 scratch (cuda._backward_ring_fixed_floats). Within a slot,
// row j's 16-byte segment s sits at s ^ (j & 7).
// Launch: grid (G * BRING_THREADS, 1, 1), G <= B CTAs (one per SM), threadgroup (BRING_THREADS, 1, 1);
// RD >= C / CH (a token's dout chunks) and RX >= 2 are passed by the launcher (cuda._backward_ring):
// pass A waits for pair p after freeing pair p - 1's x slot, so pair p must already be in flight.
#include <cuda_pipeline.h>
#include <type_traits>

#include "mhc_dynamic_mma.cuh"  // mma.sync / ldmatrix wrappers, split_a_tiles, mix_store_group (CUDA-only)

using namespace mhc;

// 8 warps: each keeps dM, u | v and dH_post accumulators (N = 32: 32 + 8 + 8 floats) and the split
// A tiles of hpre, hpost and M^T (64 registers) across its tokens, which 16 warps' 128-register
// budget would not hold.
constexpr int BRING_THREADS = 256, BRING_WARPS = BRING_THREADS / 32, SEG = 8;
constexpr int CHUNK_BYTES = 8192, CHUNK_FLOATS = CHUNK_BYTES / 4;
constexpr int STEP_COLS = 16 * BRING_WARPS;  // pass B: a 16-column group per warp

// v0, v1 (one B-fragment register's pair) split as hi + lo bfloat16 words (as split_a_tiles).
__device__ __forceinline__ void split_pair(float v0, float v1, uint32_t& hi, uint32_t& lo) {
  const bf16 h0 = from_float<bf16>(v0), h1 = from_float<bf16>(v1);
  hi = mma::pack_bf16(h0, h1);
  lo = mma::pack_bf16(from_float<bf16>(v0 - to_float(h0)), from_float<bf16>(v1 - to_float(h1)));
}

extern "C" __global__ void __launch_bounds__(BRING_THREADS, 1) MHC_NAME(
    const T* __restrict__ x, const T* __restrict__ dout, const float* __restrict__ M,
    const float* __restrict__ H_pre_raw, const float* __restrict__ H_post_raw, const float* __restrict__ w,
    const float* __restrict__ inv_rms, T* __restrict__ dx, float* __restrict__ partial, int n, int C, int B,
    int RD, int RX) {
  static_assert(std::is_same_v<T, bf16> && (NMAX == 16 || NMAX == 32), "variants.py: bf16, n16 / n32 only");
  constexpr int N = NMAX, MT = N / 16, NT = N / 8;  // n's 16-row (and 16-k) tiles, its n8 tiles
  constexpr int CH = CHUNK_BYTES / (2 * N);  // columns per chunk: 128 at n = 32, 256 at n = 16
  constexpr int CSEGS = CH / SEG;            // 16-byte segments per chunk row
  constexpr int GROUPS = CH / 16;            // 16-column groups per chunk: 8 or 16
  constexpr int SLOT_ELEMS = CHUNK_BYTES / 2;
  constexpr int COPIES = CHUNK_BYTES / 16 / BRING_THREADS;  // 16-byte copies per thread per chunk
  static_assert(COPIES * 16 * BRING_THREADS == CHUNK_BYTES && GROUPS % BRING_WARPS == 0, "chunk geometry");
  extern __shared__ float smem[];
  bf16* dring = reinterpret_cast<bf16*>(smem);
  bf16* xring = dring + (size_t)RD * SLOT_ELEMS;
  float* agg = smem + (size_t)(RD + RX) * CHUNK_FLOATS;
  float* gs = agg + C;
  float* dws = gs + C;
  float* MsT = dws + C;  // MsT[j * N + i] = M[i, j]
  float* hpre = MsT + N * N;
  float* hpost = hpre + N;
  float* scratch = hpost + N;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int K = C / CH;  // chunk pairs per token
  const int G = gridDim.x, mine = (B - (int)blockIdx.x + G - 1) / G;
  const int total = mine * K;

  // the stream: pair p is chunk p % K of this CTA's token p / K, x in slot p % RX, dout in p % RD
  int issued = 0, freed_x = 0, freed_d = 0, iss_i = 0, iss_xs = 0, iss_ds = 0;
  size_t iss_tok = (size_t)blockIdx.x * N * C;
  auto issue = [&]() {
    while (issued < total && issued - freed_x < RX && issued - freed_d < RD) {
#pragma unroll
      for (int u = 0; u < COPIES; ++u) {
        const int e = threadIdx.x + u * BRING_THREADS, j = e / CSEGS, s = e % CSEGS;
        const size_t src = iss_tok + (size_t)j * C + (size_t)iss_i * CH + s * SEG;
        __pipeline_memcpy_async(mma::swizzled_segment(xring + (size_t)iss_xs * SLOT_ELEMS, CH, j, s), x + src, 16);
        __pipeline_memcpy_async(mma::swizzled_segment(dring + (size_t)iss_ds * SLOT_ELEMS, CH, j, s), dout + src, 16);
      }
      __pipeline_commit();
      ++issued;
      if (++iss_xs == RX) iss_xs = 0;
      if (++iss_ds == RD) iss_ds = 0;
      if (++iss_i == K) {
        iss_i = 0;
        iss_tok += (size_t)G * N * C;
      }
    }
  };
  // M, the activations' inputs and the first token's inv_rms are read before the rings' first
  // copies, each later token's inv_rms a token ahead: a global load issued after the copies waits
  // behind them (as in mhc_forward_ring). Same-run A/B on the H200 (scripts/gpu_source_ab.py
  // --backward, queued forward + backward, median us; bit-identical outputs): (1024, 32, 2048)
  // 361.2 vs 364.4, (1024, 16, 4096) 414.8 vs 427.5, (4096, 16, 1024) 401.3 vs 406.5. (w is still
  // read from global in pass A: in shared memory it would cost the x ring a slot at n = 32.)
  constexpr int MREG = (N * N + BRING_THREADS - 1) / BRING_THREADS;
  float mreg[MREG];
#pragma unroll
  for (int u = 0; u < MREG; ++u) {
    const int k = threadIdx.x + u * BRING_THREADS;
    mreg[u] = k < N * N ? M[k] : 0.0f;
  }
  float hraw = 0.0f;  // threads 0 .. 2N - 1: H_pre_raw, then H_post_raw
  if (threadIdx.x < 2 * N) hraw = threadIdx.x < N ? H_pre_raw[threadIdx.x] : H_post_raw[threadIdx.x - N];
  float r_next = inv_rms[blockIdx.x];  // inv_rms of the CTA's next token, loaded a token ahead
  issue();

#pragma unroll
  for (int u = 0; u < MREG; ++u) {
    const int k = threadIdx.x + u * BRING_THREADS;
    if (k < N * N) MsT[(k % N) * N + k / N] = mreg[u];
  }
  for (int c = threadIdx.x; c < C; c += BRING_THREADS) dws[c] = 0.0f;
  if (threadIdx.x < N) hpre[threadIdx.x] = sigmoid(hraw);
  else if (threadIdx.x < 2 * N) hpost[threadIdx.x - N] = 2.0f * sigmoid(hraw);
  __syncthreads();
  uint32_t aT[2][MT][MT][4];  // M^T, split: pass B's dx = M^T dout
  mma::split_a_fragments<N, false>(MsT, aT, lane);
  uint32_t apre[2][1][MT][4], apost[2][1][MT][4];  // hpre / hpost as row 0 of an A tile, split
  mma::split_a_tiles<1, MT>(apre, lane, [&](int row, int col, int u) { return row == 0 ? hpre[col + u] : 0.0f; });
  mma::split_a_tiles<1, MT>(apost, lane, [&](int row, int col, int u) { return row == 0 ? hpost[col + u] : 0.0f; });
  const int arow = (lane & 7) + 8 * ((lane >> 3) & 1);  // ldmatrix: A rows, and B rows of .trans reads
  const int brow = (lane & 7) + 8 * (lane >> 4), bhalf = (lane >> 3) & 1;  // ldmatrix: B rows (non-trans)

  float dM[MT][NT][4] = {}, dhp[MT][4] = {}, dhpre[MT][2] = {};
  int xs = 0, ds0 = 0;  // x slot of the next pair to use; dout slot of the current token's pair 0
  for (int t = 0; t < mine; ++t) {
    const size_t b = blockIdx.x + (size_t)t * G;
    const float r = r_next;
    if (t + 1 < mine) r_next = inv_rms[b + G];
    float uv[MT][4] = {};  // this token's u (column 0) and v (column 1) of rows 16 mt + g (+ 8)
    float dot = 0.0f;
    // pass A, pair by pair as they land
    for (int i = 0; i < K; ++i) {
      const int p = t * K + i;
      mma::wait_pending(issued - 1 - p);
      __syncthreads();  // every thread's copies of pair p landed; pair p - 1's x slot is no longer read
      freed_x = p;
      issue();
      bf16* X = xring + (size_t)xs * SLOT_ELEMS;
      const int dsl = ds0 + i;  // i < K <= RD
      bf16* D = dring + (size_t)(dsl >= RD ? dsl - RD : dsl) * SLOT_ELEMS;
      if (++xs == RX) xs = 0;
#pragma unroll
      for (int gi = 0; gi < GROUPS / BRING_WARPS; ++gi) {
        const int grp = warp + gi * BRING_WARPS, c0 = i * CH + 16 * grp;
        // agg = hpre x and dy = hpost dout for the group's 16 columns (lanes 0-3: row 0 of C/D)
        float da[2][4] = {}, dd[2][4] = {};
#pragma unroll
        for (int kt = 0; kt < MT; ++kt) {
          uint32_t bx[4], bd[4];
          mma::ldmatrix_x4<true>(bx, mma::swizzled_segment(X, CH, kt * 16 + arow, 2 * grp + (lane >> 4)));
          mma::ldmatrix_x4<true>(bd, mma::swizzled_segment(D, CH, kt * 16 + arow, 2 * grp + (lane >> 4)));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            mma::bf16_16816(da[nt], apre[1][0][kt], bx[2 * nt], bx[2 * nt + 1]);  // lo first
            mma::bf16_16816(da[nt], apre[0][0][kt], bx[2 * nt], bx[2 * nt + 1]);
            mma::bf16_16816(dd[nt], apost[1][0][kt], bd[2 * nt], bd[2 * nt + 1]);
            mma::bf16_16816(dd[nt], apost[0][0][kt], bd[2 * nt], bd[2 * nt + 1]);
          }
        }
        // lanes 0-3 own columns c0 + 8 nt + 2q (+ 1): y, g, the dot, dw, and pass B's agg and g
        float y[2][2] = {}, rg[2][2] = {};
        if (lane < 4) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int c = c0 + 8 * nt + 2 * q;
            const float2 wv = *reinterpret_cast<const float2*>(w + c);
            const float a0 = da[nt][0], a1 = da[nt][1], g0 = dd[nt][0] * wv.x, g1 = dd[nt][1] * wv.y;
            y[nt][0] = a0 * r * wv.x;
            y[nt][1] = a1 * r * wv.y;
            rg[nt][0] = r * g0;
            rg[nt][1] = r * g1;
            dot = fmaf(g0, a0, fmaf(g1, a1, dot));
            dws[c] = fmaf(dd[nt][0] * a0, r, dws[c]);
            dws[c + 1] = fmaf(dd[nt][1] * a1, r, dws[c + 1]);
            *reinterpret_cast<float2*>(agg + c) = make_float2(a0, a1);
            *reinterpret_cast<float2*>(gs + c) = make_float2(g0, g1);
          }
        }
        // B columns as split fragments (k = the group's columns): y in column 0 (lanes 0-3) for
        // dout's rows; r g in column 0 (lanes 0-3) and agg in column 1 (lanes 4-7) for x's rows
        uint32_t by[2][2], bgv[2][2];  // [term hi / lo][b0 / b1]
        {
          float gv[2][2];
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float av = __shfl_sync(0xffffffffu, da[nt][e], q);  // lane q's agg (row 0)
              gv[nt][e] = g == 0 ? rg[nt][e] : g == 1 ? av : 0.0f;
            }
          split_pair(y[0][0], y[0][1], by[0][0], by[1][0]);
          split_pair(y[1][0], y[1][1], by[0][1], by[1][1]);
          split_pair(gv[0][0], gv[0][1], bgv[0][0], bgv[1][0]);
          split_pair(gv[1][0], gv[1][1], bgv[0][1], bgv[1][1]);
        }
        // A fragments of dout's and x's rows for the group's k16 slice; B fragments of x's rows (dM)
        uint32_t ad[MT][4], ax[MT][4], bxr[NT / 2][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma::ldmatrix_x4<false>(ad[mt], mma::swizzled_segment(D, CH, 16 * mt + arow, 2 * grp + (lane >> 4)));
          mma::ldmatrix_x4<false>(ax[mt], mma::swizzled_segment(X, CH, 16 * mt + arow, 2 * grp + (lane >> 4)));
        }
#pragma unroll
        for (int pp = 0; pp < NT / 2; ++pp)
          mma::ldmatrix_x4<false>(bxr[pp], mma::swizzled_segment(X, CH, 16 * pp + brow, 2 * grp + bhalf));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma::bf16_16816(dhp[mt], ad[mt], by[1][0], by[1][1]);  // lo first
          mma::bf16_16816(dhp[mt], ad[mt], by[0][0], by[0][1]);
          mma::bf16_16816(uv[mt], ax[mt], bgv[1][0], bgv[1][1]);
          mma::bf16_16816(uv[mt], ax[mt], bgv[0][0], bgv[0][1]);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma::bf16_16816(dM[mt][nt], ad[mt], bxr[nt / 2][2 * (nt % 2)], bxr[nt / 2][2 * (nt % 2) + 1]);
        }
      }
    }
    const float kk = r * r * r * block_sum(dot, scratch) / C;  // ends synchronised: agg and g are complete
    freed_x = (t + 1) * K;  // the token's last x slot too (every warp is past the barrier above)
    issue();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {  // dH_pre[j] += u[j] - k v[j] (columns 0 and 1: lanes q == 0)
      dhpre[mt][0] += uv[mt][0] - kk * uv[mt][1];
      dhpre[mt][1] += uv[mt][2] - kk * uv[mt][3];
    }

    // pass B, STEP_COLS columns a step: warp w takes 16-column group w of the step
    T* db = dx + b * N * C;
    for (int st = 0; st < C / STEP_COLS; ++st) {
      const int c0 = st * STEP_COLS + 16 * warp, i = c0 / CH, seg0 = (c0 % CH) / SEG, cl = c0 + 2 * q;
      const int dsl = ds0 + i;
      mma::mix_store_group<N>(
          aT, dring + (size_t)(dsl >= RD ? dsl - RD : dsl) * SLOT_ELEMS, CH, seg0, hpre,
          [&](int nt) {
            const int c = cl + 8 * nt;
            const float2 gv = *reinterpret_cast<const float2*>(gs + c), av = *reinterpret_cast<const float2*>(agg + c);
            return make_float2(r * gv.x - kk * av.x, r * gv.y - kk * av.y);
          },
          db + c0, C, lane);
      // every warp stored its group (and is done with agg and g once the last step is): the dout
      // chunks wholly behind this step may be refilled
      __syncthreads();
      freed_d = t * K + (st + 1) * STEP_COLS / CH;
      issue();
    }
    ds0 += K;
    if (ds0 >= RD) ds0 -= RD;
  }

  // the CTA's sums: each warp's accumulators to shared memory (the rings are idle now), then a
  // fixed-order sum over warps
  __pipeline_wait_prior(0);
  __syncthreads();
  float* wsum = smem;  // [warp][N * N + 2 N]
  constexpr int P = N * N + 2 * N;
  float* mine_sums = wsum + warp * P;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        mine_sums[(16 * mt + g + 8 * (e >> 1)) * N + 8 * nt + 2 * q + (e & 1)] = dM[mt][nt][e];
    if (q == 0) {
      mine_sums[N * N + 16 * mt + g] = dhpre[mt][0];
      mine_sums[N * N + 16 * mt + g + 8] = dhpre[mt][1];
      mine_sums[N * N + N + 16 * mt + g] = dhp[mt][0];
      mine_sums[N * N + N + 16 * mt + g + 8] = dhp[mt][2];
    }
  }
  __syncthreads();
  float* out = partial + (size_t)blockIdx.x * (P + C);
  for (int e = threadIdx.x; e < P; e += BRING_THREADS) {
    float s = 0.0f;
#pragma unroll
    for (int v = 0; v < BRING_WARPS; ++v) s += wsum[v * P + e];
    out[e] = s;
  }
  for (int c = threadIdx.x; c < C; c += BRING_THREADS) out[P + c] = dws[c];
}
