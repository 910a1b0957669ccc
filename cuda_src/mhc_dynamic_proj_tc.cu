// Forward projection on tensor cores, for bfloat16 x and M = n n + 2 n <= 24 (n <= 4):
//   part[s, t, m] = sum_{k in split s} x[t, k] phi[k, m],   sq[s, t] = sum_{k in split s} x[t, k]^2
// the same outputs as mhc_dynamic_skinny (which serves every other case). bfloat16 x is exact in
// the bfloat16 MMA; float32 phi is split as phi = hi + mid + lo (three bfloat16 terms, exact to
// 2^-24 relative), so three MMAs with float32 accumulation give a float32-accurate product.
//
// CTA: 64 tokens x 24 columns (three n8 tiles of mma.m16n8k16), K streamed KC = 128 at a time
// (256 bytes of each row) through ns = 4 shared-memory stages (cp.async, 16 bytes per copy;
// element loads when rows are not 16-byte aligned): three stages are in flight while one is
// multiplied, so the x stream never waits on one load-compute cycle. ns = 3 where a CTA may not
// have SMEM_BYTES(4) (99 KB per block on sm_86 / sm_89): the launcher passes it. Warp w takes k16-step w of
// every stage for all 64 tokens: its A fragments come by ldmatrix (each x element is read from
// shared memory once), its B fragments (phi's three terms, split once per CTA into fragment
// order, one 8-byte load per lane and MMA tile) serve four token tiles. The eight k-groups' sums
// meet in shared memory at the end. Sums of squares: each thread squares the 16-byte vectors it
// copied itself (always the same rows), once they have landed.
// (ncu, H100, T = 8192, K = 16384: the WMMA version with one token tile per warp and B fragments
// reloaded per tile ran 247 us at 33% of DRAM bandwidth, bound by its shared-memory reads; this
// scheme on 128 tokens x 64 k stages, 128 bytes of a row per stage, 139 us at 59%.)
// Grid (threads): (THREADS, S, ceil(T / 128)): token tiles are the slowest grid dimension, so the
// tokens read last are still in L2 when the coefficients kernel starts. The S splits over K
// (grid y, chosen by the launcher so that every CTA is resident at once) interleave: split s takes
// the KC-chunks s, s + S, s + 2 S, ..., so a tile's S CTAs, which run side by side, read S KC
// contiguous elements of each row at a time (with contiguous ranges per split, each CTA pulled its
// row segments from S distant places: 52% of DRAM bandwidth instead of 59%, ncu H100).
// Shared memory (dynamic): SMEM_BYTES(ns). Needs sm_80+.
#include <cuda_pipeline.h>

#include "mhc_dynamic_common.cuh"
#include "mhc_mma.cuh"

using namespace mhc;

namespace {
constexpr int TB = 64, KC = 128, NT = 3, MP = 8 * NT;
constexpr int V = 8;                              // bf16 per 16-byte vector
constexpr int XLD = KC + 8;                       // bf16 per x row in shared memory: ldmatrix rows hit distinct banks
constexpr int XV = TB * KC / V / THREADS;         // x vectors per thread per stage
constexpr int KSTEPS = KC / 16;                   // k16 steps per stage = k-groups of warps
constexpr int SLOTS = KSTEPS * NT * 32;           // B-fragment lanes per stage (4 phi values each)
constexpr int SLOTS_PER_THREAD = (SLOTS + THREADS - 1) / THREADS;
constexpr int X_BYTES = TB * XLD * 2, P_BYTES = SLOTS * 3 * 8;
constexpr int RL = MP + 1;                        // floats per token row of the k-group sums (odd: fewer conflicts)
// [phi fragments, 2 buffers][x stages, ns buffers]
constexpr int SMEM_BYTES(int ns) { return 2 * P_BYTES + ns * X_BYTES; }
static_assert(THREADS == 256 && KSTEPS == THREADS / 32 && TB == 64, "8 warps: one k16 step each, four 16-token tiles");
static_assert(KC / V == 16 && XV == 4, "a row's 16 vectors are 16 consecutive threads (the sums of squares' shuffles)");
static_assert(KSTEPS * TB * RL * 4 <= SMEM_BYTES(3), "the k-group sums reuse the buffers' bytes");
static_assert(X_BYTES == 17408 && 2 * P_BYTES == 36864, "keep TC_SMEM_STAGE / TC_SMEM_FIXED in mhc_aot/cuda_dynamic.py equal");
}  // namespace

// two CTAs per SM (shared memory allows two): at most 128 registers per thread
extern "C" __global__ void __launch_bounds__(THREADS, 2) MHC_NAME(
    const bf16* __restrict__ x, const float* __restrict__ phi, float* __restrict__ part, float* __restrict__ sq,
    int Tn, int K, int M, int ns) {
  extern __shared__ float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  auto xs = [&](int buf) { return reinterpret_cast<bf16 (*)[XLD]>(base + 2 * P_BYTES + buf * X_BYTES); };
  // phi's B fragments of stage buffer pb: [k16 step][n8 tile][term][lane], 8 bytes each
  auto pf = [&](int pb) { return reinterpret_cast<uint2*>(base + pb * P_BYTES); };
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const int kg = warp;
  const int s = blockIdx.y, S = gridDim.y, t0 = blockIdx.z * TB;  // token tiles slowest: the last tokens read stay in L2
  const int chunks = (K + KC - 1) / KC, stages = s < chunks ? (chunks - s + S - 1) / S : 0;
  // stage st of this split: k in [k_first(st), k_last(st)), chunk s + st S
  auto k_first = [&](int st) { return (s + st * S) * KC; };
  auto k_last = [&](int st) { return min(K, k_first(st) + KC); };
  const bool vec = K % V == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;

  // x tile of stage st into buffer st % ns: thread tid copies vectors tid + i THREADS
  auto stage_x = [&](int st) {
    bf16 (*dst)[XLD] = xs(st % ns);
    const int k0 = k_first(st), k_end = k_last(st);
#pragma unroll
    for (int i = 0; i < XV; ++i) {
      const int e = tid + i * THREADS, r = e / (KC / V), c = (e % (KC / V)) * V;
      const int t = t0 + r, k = k0 + c;
      if (vec && t < Tn && k + V <= k_end) {
        __pipeline_memcpy_async(&dst[r][c], x + (size_t)t * K + k, 16);
      } else {
#pragma unroll
        for (int e2 = 0; e2 < V; ++e2)
          dst[r][c + e2] = (t < Tn && k + e2 < k_end) ? x[(size_t)t * K + k + e2] : from_float<bf16>(0.0f);
      }
    }
  };
  // the phi values of this thread's B-fragment slots of stage st (zeros past the chunk's end and M)
  auto load_phi = [&](int st, float (&v)[SLOTS_PER_THREAD][4]) {
    const int k0 = k_first(st), k_end = k_last(st);
#pragma unroll
    for (int i = 0; i < SLOTS_PER_THREAD; ++i) {
      const int e = tid + i * THREADS, l = e % 32, nt = (e / 32) % NT, kk = e / (32 * NT);
      const int m = nt * 8 + l / 4, r0 = kk * 16 + 2 * (l % 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = k0 + r0 + (j & 1) + 8 * (j >> 1);
        v[i][j] = (e < SLOTS && m < M && k < k_end) ? __ldg(phi + (size_t)k * M + m) : 0.0f;
      }
    }
  };
  auto store_phi = [&](const float (&v)[SLOTS_PER_THREAD][4], int pb) {
    uint2* dst = pf(pb);
#pragma unroll
    for (int i = 0; i < SLOTS_PER_THREAD; ++i) {
      const int e = tid + i * THREADS;
      if (e >= SLOTS) continue;
      const int l = e % 32, rest = e / 32;  // rest = kk * NT + nt
      uint2 terms[3];
      mma::split_b_fragment(v[i], terms);
#pragma unroll
      for (int p = 0; p < 3; ++p) dst[(rest * 3 + p) * 32 + l] = terms[p];
    }
  };

  float acc[4][NT][4] = {}, sqa[XV] = {};
  float pv[SLOTS_PER_THREAD][4];
#pragma unroll
  for (int st = 0; st < ns - 1; ++st) {
    if (st < stages) stage_x(st);
    __pipeline_commit();
  }
  if (stages > 0) {
    load_phi(0, pv);
    store_phi(pv, 0);
    if (stages > 1) load_phi(1, pv);
  }
  for (int it = 0; it < stages; ++it) {
    if (ns == 4) {  // this thread's copies of stage `it` have landed (ns - 2 groups may be pending)
      __pipeline_wait_prior(2);
    } else {
      __pipeline_wait_prior(1);
    }
    __syncthreads();  // everyone's have; phi buffer it & 1 is stored; stage it - 1's buffers are consumed
    if (it + ns - 1 < stages) stage_x(it + ns - 1);  // into the buffer stage it - 1 used
    __pipeline_commit();
    const uint2* pb = pf(it & 1) + kg * NT * 3 * 32 + lane;
    uint32_t b[NT][3][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int p = 0; p < 3; ++p) {
        const uint2 u = pb[(nt * 3 + p) * 32];
        b[nt][p][0] = u.x;
        b[nt][p][1] = u.y;
      }
    bf16 (*xb)[XLD] = xs(it % ns);
#pragma unroll
    for (int i = 0; i < XV; ++i) {  // this thread's own vectors (16-byte loads; zeros where padded)
      const int e = tid + i * THREADS;
      const uint4 u = *reinterpret_cast<const uint4*>(&xb[e / (KC / V)][(e % (KC / V)) * V]);
      const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {  // bfloat16 is the top half of a float32
        const float lo = __uint_as_float(w[h] << 16), hi = __uint_as_float(w[h] & 0xffff0000u);
        sqa[i] = fmaf(lo, lo, sqa[i]);
        sqa[i] = fmaf(hi, hi, sqa[i]);
      }
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      uint32_t a[4];
      mma::ldmatrix_x4<false>(a, &xb[mt * 16 + lane % 16][kg * 16 + (lane / 16) * 8]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int p = 2; p >= 0; --p) mma::bf16_16816(acc[mt][nt], a, b[nt][p][0], b[nt][p][1]);  // lo terms first
    }
    if (it + 1 < stages) {
      store_phi(pv, (it + 1) & 1);  // buffer (it + 1) & 1 was last read in iteration it - 1
      if (it + 2 < stages) load_phi(it + 2, pv);
    }
  }
  // sums of squares: a row's 16 threads are 16 consecutive lanes
#pragma unroll
  for (int i = 0; i < XV; ++i) {
    float v = sqa[i];
#pragma unroll
    for (int o = 1; o < KC / V; o *= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int t = t0 + (tid + i * THREADS) / (KC / V);
    if (tid % (KC / V) == 0 && t < Tn) sq[(size_t)s * Tn + t] = v;
  }
  // the eight k-groups' sums, [k-group][token][RL] over the buffers' bytes
  __syncthreads();  // every warp is past its last ldmatrix (no copies are pending: the last waited)
  float* red = smem;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    const int r = mt * 16 + g;
    float* lo = red + ((size_t)kg * TB + r) * RL;
    float* hi = lo + 8 * RL;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * q;
      lo[c] = acc[mt][nt][0];
      lo[c + 1] = acc[mt][nt][1];
      hi[c] = acc[mt][nt][2];
      hi[c + 1] = acc[mt][nt][3];
    }
  }
  __syncthreads();
  for (int e = tid; e < TB * M; e += THREADS) {
    const int r = e / M, m = e % M, t = t0 + r;
    if (t >= Tn) continue;
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < KSTEPS; ++k) v += red[((size_t)k * TB + r) * RL + m];
    part[((size_t)s * Tn + t) * M + m] = v;
  }
}
