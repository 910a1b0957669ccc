// Forward projection on tensor cores, for bfloat16 x and M = n n + 2 n <= 24 (n <= 4):
//   part[s, t, m] = sum_{k in split s} x[t, k] phi[k, m],   sq[s, t] = sum_{k in split s} x[t, k]^2
// the same outputs as mhc_dynamic_skinny (which serves every other case). bfloat16 x is exact in
// the bfloat16 MMA; float32 phi is split as phi = hi + mid + lo (three bfloat16 terms, exact to
// 2^-24 relative), so three MMAs with float32 accumulation give a float32-accurate product. A phi
// that is bfloat16 already (as in Liger's benchmark: phi in x's dtype) is its own hi, mid = lo = 0:
// the MHC_PHI_TERMS = 1 variant multiplies by hi alone, the same product in a third of the MMAs and
// of phi's fragment bytes (session 16's timing-only variant: three terms cost ~14 us of a T = 8192
// forward over one, H200).
//
// CTA: 128 tokens x 24 columns (three n8 tiles of mma.m16n8k16), K streamed KC = 64 at a time
// through NS = 4 shared-memory stages (cp.async, 16 bytes per copy; element loads when rows are
// not 16-byte aligned): three stages are in flight while one is multiplied, so the x stream never
// waits on one load-compute cycle. Warp w takes k16-step w % 4 of every stage for 64 tokens
// (w / 4): its A fragments come by ldmatrix (each x element is read from shared memory once), its
// B fragments (phi's three terms, one 8-byte load per lane, MMA tile and term) serve four token
// tiles. mhc_dynamic_phi_split wrote them once per forward in fragment order, a contiguous 9216-byte (one term: 3072)
// block a chunk, which the CTA copies through registers into one of two shared buffers (loaded two
// stages ahead, stored one ahead); each CTA loading and splitting phi itself cost ~16 us of a
// T = 8192 forward on the H200 (the same chunks split again in every token tile). The four
// k-groups' sums meet in shared memory at the end. The sum of squares rides on the same A
// fragments, on the CUDA cores (bfloat16 squares are exact float32 products; as the x x^T diagonal
// on tensor cores, two more MMAs per 16 x 16 block, it held up the tensor pipe: 18 us of a T = 8192
// forward on the H200).
// (ncu, H100, T = 8192, K = 16384: the WMMA version with one token tile per warp and B fragments
// reloaded per tile ran 247 us at 33% of DRAM bandwidth, bound by its shared-memory reads.)
// Grid (threads): (THREADS, S, ceil(T / 128)): token tiles are the slowest grid dimension, so the
// tokens read last are still in L2 when the coefficients kernel starts. The S splits over K
// (grid y, chosen by the launcher so that every CTA is resident at once) interleave: split s takes
// the KC-chunks s, s + S, s + 2 S, ..., so a tile's S CTAs, which run side by side, read S KC
// contiguous elements of each row at a time (ncu, H100, T = 8192: 139 us at 59% of DRAM bandwidth;
// contiguous ranges per split, each CTA pulling 128 bytes per row per stage from four distant
// places: 157 us at 52%; 64-token x 128-k stages, interleaved, eight k-groups: 153 us at 53%).
// Shared memory (dynamic): SMEM_BYTES. Needs sm_80+.
#include <cuda_pipeline.h>

#include "mhc_dynamic_common.cuh"
#include "mhc_dynamic_mma.cuh"

using namespace mhc;

namespace {
// MHC_TC_NS: the stages, a define for same-run A/Bs only (scripts/gpu_dynamic_ab.py with the matching
// TC_SMEM_BYTES); the launcher's TC_SMEM_BYTES is for 4.
#ifndef MHC_TC_NS
#define MHC_TC_NS 4
#endif
// MHC_PHI_TERMS: phi's bfloat16 terms (build_tools/variants.py: 3 for a float32 phi, 1 for a bfloat16 one)
#ifndef MHC_PHI_TERMS
#define MHC_PHI_TERMS 3
#endif
constexpr int TERMS = MHC_PHI_TERMS;
constexpr int TB = 128, KC = 64, NS = MHC_TC_NS, NT = 3, MP = 8 * NT;
constexpr int V = 8;                              // bf16 per 16-byte vector
constexpr int XLD = KC + 8;                       // bf16 per x row in shared memory: ldmatrix rows hit distinct banks
constexpr int XV = TB * KC / V / THREADS;         // x vectors per thread per stage
constexpr int KSTEPS = KC / 16;                   // k16 steps per stage = k-groups of warps
using PhiStage = mma::BStage<KSTEPS, NT, THREADS, TERMS>;  // phi's B fragments of one stage
constexpr int X_BYTES = TB * XLD * 2, P_BYTES = PhiStage::BYTES;
constexpr int PV = (P_BYTES / 16 + THREADS - 1) / THREADS;  // 16-byte pieces of a stage's B fragments a thread
constexpr int RL = MP + 1;                        // floats per token row of the k-group sums (odd: fewer conflicts)
constexpr int SMEM_BYTES = NS * X_BYTES + 2 * P_BYTES;
static_assert(THREADS == 256 && KSTEPS * 2 == THREADS / 32, "8 warps: 4 k-groups x 2 token halves");
static_assert(KSTEPS * TB * RL * 4 <= NS * X_BYTES, "the k-group sums reuse the x stages' bytes");
static_assert(NS != 4 || SMEM_BYTES == (TERMS == 3 ? 92160 : 79872), "keep TC_SMEM_BYTES in mhc_aot/cuda_dynamic.py equal");
}  // namespace

// two CTAs per SM (shared memory allows two): at most 128 registers per thread
extern "C" __global__ void __launch_bounds__(THREADS, 2) MHC_NAME(
    const bf16* __restrict__ x, const uint2* __restrict__ frag, float* __restrict__ part, float* __restrict__ sq,
    int Tn, int K, int M) {
  extern __shared__ float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  auto xs = [&](int st) { return reinterpret_cast<bf16 (*)[XLD]>(base + st * X_BYTES); };
  // phi's B fragments of stage buffer pb: [k16 step][n8 tile][term][lane], 8 bytes each
  auto pf = [&](int pb) { return reinterpret_cast<uint2*>(base + NS * X_BYTES + pb * P_BYTES); };
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const int kg = warp % KSTEPS, mg = warp / KSTEPS;
  const int s = blockIdx.y, S = gridDim.y, t0 = blockIdx.z * TB;  // token tiles slowest: the last tokens read stay in L2
  const int chunks = (K + KC - 1) / KC, stages = s < chunks ? (chunks - s + S - 1) / S : 0;
  // stage st of this split: k in [k_first(st), k_last(st)), chunk s + st S
  auto k_first = [&](int st) { return (s + st * S) * KC; };
  auto k_last = [&](int st) { return min(K, k_first(st) + KC); };
  const bool vec = K % V == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  // whole: every chunk is KC columns of 16-byte aligned rows (n C % 64 == 0, the usual case). Then a
  // thread's x copies sit at fixed offsets from the chunk's first column, kept across stages: a
  // stage costs an add and the copy each instead of the bounds-checked address arithmetic of the
  // general path (ncu, H200, T = 8192: 105.3 vs 108.0 us, measured while this CTA still loaded phi
  // itself, which it then did the same way).
  const bool whole = vec && K % KC == 0;
  // thread tid's x vectors: rows tid / 8 + 32 i of the tile, columns 8 (tid % 8) .. + 7 of the chunk
  static_assert(KC / V == 8 && THREADS % 8 == 0, "a thread's vectors share one column");
  constexpr int XROWS = THREADS / (KC / V);
  const int xr = tid / (KC / V), xc = (tid % (KC / V)) * V;
  const bf16* xsrc = x + (size_t)(t0 + xr) * K + xc;

  // x tile of stage st into buffer st % NS: thread tid copies vectors tid + i THREADS
  auto stage_x = [&](int st) {
    bf16 (*dst)[XLD] = xs(st % NS);
    const int k0 = k_first(st), k_end = k_last(st);
    if (whole) {
#pragma unroll
      for (int i = 0; i < XV; ++i) {
        const int r = xr + i * XROWS;
        if (t0 + r < Tn) {
          __pipeline_memcpy_async(&dst[r][xc], xsrc + (size_t)i * XROWS * K + k0, 16);
        } else {  // rows past the last token: zeros (their sums are never stored)
          *reinterpret_cast<uint4*>(&dst[r][xc]) = make_uint4(0u, 0u, 0u, 0u);
        }
      }
      return;
    }
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
  // the B fragments of stage st (frag's block for chunk s + st S): this thread's 16-byte pieces
  // e = tid + i THREADS, loaded, then stored into buffer pb
  auto load_phi = [&](int st, uint4 (&v)[PV]) {
    const uint4* src = reinterpret_cast<const uint4*>(frag + (size_t)(s + st * S) * (P_BYTES / 8));
#pragma unroll
    for (int i = 0; i < PV; ++i)
      if (tid + i * THREADS < P_BYTES / 16) v[i] = __ldg(src + tid + i * THREADS);
  };
  auto store_phi = [&](const uint4 (&v)[PV], int pb) {
    uint4* dst = reinterpret_cast<uint4*>(pf(pb));
#pragma unroll
    for (int i = 0; i < PV; ++i)
      if (tid + i * THREADS < P_BYTES / 16) dst[tid + i * THREADS] = v[i];
  };

  float acc[4][NT][4] = {}, sqacc[4][2] = {};  // sqacc[mt]: this lane's columns of rows g, g + 8
  uint4 pv[PV];
#pragma unroll
  for (int st = 0; st < NS - 1; ++st) {
    if (st < stages) stage_x(st);
    __pipeline_commit();
  }
  if (stages > 0) {
    load_phi(0, pv);
    store_phi(pv, 0);
    if (stages > 1) load_phi(1, pv);
  }
  for (int it = 0; it < stages; ++it) {
    __pipeline_wait_prior(NS - 2);  // this thread's copies of stage `it` have landed
    __syncthreads();  // everyone's have; phi buffer it & 1 is stored; stage it - 1's buffers are consumed
    if (it + NS - 1 < stages) stage_x(it + NS - 1);  // into the buffer stage it - 1 used
    __pipeline_commit();
    uint32_t b[NT][TERMS][2];
    PhiStage::fragments(b, pf(it & 1), kg, lane);
    bf16 (*xb)[XLD] = xs(it % NS);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      uint32_t a[4];
      mma::ldmatrix_x4<false>(a, &xb[mg * 64 + mt * 16 + lane % 16][kg * 16 + (lane / 16) * 8]);
      mma::mma_terms<NT, TERMS>(acc[mt], a, b);
      // sums of squares on the CUDA cores from the same A fragments (a[0], a[2]: row g; a[1], a[3]:
      // row g + 8; bfloat16 squares are exact float32 products), off the tensor pipe, which the three
      // split terms keep busy (H200, T = 8192: the x x^T diagonal on tensor cores cost ~18 us a forward)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          const uint32_t word = a[h + 2 * w];
          const float lo = __uint_as_float(word << 16), hi = __uint_as_float(word & 0xffff0000u);
          sqacc[mt][h] = fmaf(lo, lo, sqacc[mt][h]);
          sqacc[mt][h] = fmaf(hi, hi, sqacc[mt][h]);
        }
    }
    if (it + 1 < stages) {
      store_phi(pv, (it + 1) & 1);  // buffer (it + 1) & 1 was last read in iteration it - 1
      if (it + 2 < stages) load_phi(it + 2, pv);
    }
  }
  // the four k-groups' sums, [k-group][token][RL] in the x stages' bytes
  __syncthreads();  // every warp is past its last ldmatrix (no copies are pending: the last waited)
  float* red = smem;
  mma::store_tiles(acc, red + ((size_t)kg * TB + mg * 64) * RL, RL, lane);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    float* lo = red + ((size_t)kg * TB + mg * 64 + mt * 16 + g) * RL;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the row's four lanes (q) in a fixed order
      float v = sqacc[mt][h];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (q == 0) lo[h * 8 * RL + MP] = v;
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
  for (int r = tid; r < TB; r += THREADS) {
    const int t = t0 + r;
    if (t >= Tn) continue;
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < KSTEPS; ++k) v += red[((size_t)k * TB + r) * RL + MP];
    sq[(size_t)s * Tn + t] = v;
  }
}
