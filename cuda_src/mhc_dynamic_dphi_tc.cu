// Backward dphi on tensor cores, for bfloat16 x and M = n n + 2 n <= 24 (n <= 4):
//   part[s, k, m] = sum_{t in split s} x[t, k] dz[t, m]
// the same partials as mhc_dynamic_skinny's dphi (which serves every other case); their sum over
// s is mhc_dynamic_colsum's. bfloat16 x is exact in the bfloat16 MMA; float32 dz is split as
// dz = hi + mid + lo (three bfloat16 terms, exact to 2^-24 relative): three MMAs, float32 sums.
//
// The transpose of mhc_dynamic_proj_tc's scheme: CTA = 128 k's (the MMA rows, A = x^T by
// ldmatrix.trans from the token-major x tile) x 24 columns; tokens streamed TC = 64 at a time
// through NS = 4 shared-memory stages (cp.async, 16 bytes per copy; element loads when rows are
// not 16-byte aligned). Warp w takes token step w % 4 (16 tokens) of every stage for 64 k's
// (w / 4); dz's three terms are split once per CTA into B-fragment order and serve four k tiles
// per load. The four token groups' sums meet in shared memory at the end.
// (ncu, H100, T = 8192, K = 16384: the WMMA version, B fragments reloaded per k tile, ran 223 us
// at 37% of DRAM bandwidth.)
// Grid (threads): (THREADS, ceil(K / 128), S); the split over tokens (grid z) is chosen by the
// launcher so that every CTA is resident at once. Shared memory (dynamic): SMEM_BYTES. sm_80+.
#include <cuda_pipeline.h>

#include "mhc_dynamic_common.cuh"
#include "mhc_dynamic_mma.cuh"

using namespace mhc;

namespace {
constexpr int KB = 128, TC = 64, NS = 4, NT = 3, MP = 8 * NT;
constexpr int V = 8;                              // bf16 per 16-byte vector
constexpr int XLD = KB + 8;                       // bf16 per token row in shared memory: ldmatrix rows hit distinct banks
constexpr int XV = TC * KB / V / THREADS;         // x vectors per thread per stage
constexpr int TSTEPS = TC / 16;                   // token steps per stage = token groups of warps
using DzStage = mma::BStage<TSTEPS, NT, THREADS>;  // dz's B fragments of one stage
constexpr int X_BYTES = TC * XLD * 2, Z_BYTES = DzStage::BYTES;
constexpr int RL = MP + 1;                        // floats per k row of the token-group sums (odd: fewer conflicts)
constexpr int SMEM_BYTES = NS * X_BYTES + 2 * Z_BYTES;
static_assert(THREADS == 256 && TSTEPS * 2 == THREADS / 32, "8 warps: 4 token groups x 2 k halves");
static_assert(TSTEPS * KB * RL * 4 <= NS * X_BYTES, "the token-group sums reuse the x stages' bytes");
static_assert(SMEM_BYTES == 88064, "keep DPHI_SMEM_BYTES in mhc_aot/cuda_dynamic.py equal");
}  // namespace

// two CTAs per SM (shared memory allows two): at most 128 registers per thread
extern "C" __global__ void __launch_bounds__(THREADS, 2) MHC_NAME(
    const bf16* __restrict__ x, const float* __restrict__ dz, float* __restrict__ part,
    int Tn, int K, int M, int tsplit) {
  extern __shared__ float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  auto xs = [&](int st) { return reinterpret_cast<bf16 (*)[XLD]>(base + st * X_BYTES); };  // xs[t][k]
  // dz's B fragments of buffer zb: [token step][n8 tile][term][lane], 8 bytes each
  auto zf = [&](int zb) { return reinterpret_cast<uint2*>(base + NS * X_BYTES + zb * Z_BYTES); };
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int tg = warp % TSTEPS, mg = warp / TSTEPS;
  const int k0 = blockIdx.y * KB, s = blockIdx.z;
  const int t_begin = s * tsplit, t_end = min(Tn, t_begin + tsplit);
  const int stages = t_begin < t_end ? (t_end - t_begin + TC - 1) / TC : 0;
  const bool vec = K % V == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;

  auto stage_x = [&](int st) {
    bf16 (*dst)[XLD] = xs(st % NS);
    const int tt0 = t_begin + st * TC;
#pragma unroll
    for (int i = 0; i < XV; ++i) {
      const int e = tid + i * THREADS, r = e / (KB / V), c = (e % (KB / V)) * V, t = tt0 + r, k = k0 + c;
      if (vec && t < t_end && k + V <= K) {
        __pipeline_memcpy_async(&dst[r][c], x + (size_t)t * K + k, 16);
      } else {
#pragma unroll
        for (int e2 = 0; e2 < V; ++e2)
          dst[r][c + e2] = (t < t_end && k + e2 < K) ? x[(size_t)t * K + k + e2] : from_float<bf16>(0.0f);
      }
    }
  };
  // this thread's dz values of stage st (zeros past t_end), then split into buffer zb
  auto load_dz = [&](int st, float (&v)[DzStage::PER_THREAD][4]) {
    DzStage::load(v, dz, t_begin + st * TC, t_end, M, tid);
  };
  auto store_dz = [&](const float (&v)[DzStage::PER_THREAD][4], int zb) { DzStage::store(v, zf(zb), tid); };

  float acc[4][NT][4] = {};
  float zv[DzStage::PER_THREAD][4];
#pragma unroll
  for (int st = 0; st < NS - 1; ++st) {
    if (st < stages) stage_x(st);
    __pipeline_commit();
  }
  if (stages > 0) {
    load_dz(0, zv);
    store_dz(zv, 0);
    if (stages > 1) load_dz(1, zv);
  }
  // ldmatrix.trans addresses: matrix j = lane / 8 is (tokens 8 (j / 2) + 0..7, k's 8 (j % 2) + 0..7)
  // of a 16 x 16 block, giving A = x^T's registers a[0..3] in order
  const int lrow = lane % 8 + 8 * (lane / 16), lcol = 8 * ((lane / 8) % 2);
  for (int it = 0; it < stages; ++it) {
    __pipeline_wait_prior(NS - 2);  // this thread's copies of stage `it` have landed
    __syncthreads();  // everyone's have; dz buffer it & 1 is stored; stage it - 1's buffers are consumed
    if (it + NS - 1 < stages) stage_x(it + NS - 1);  // into the buffer stage it - 1 used
    __pipeline_commit();
    uint32_t b[NT][3][2];
    DzStage::fragments(b, zf(it & 1), tg, lane);
    bf16 (*xb)[XLD] = xs(it % NS);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      uint32_t a[4];
      mma::ldmatrix_x4<true>(a, &xb[tg * 16 + lrow][mg * 64 + mt * 16 + lcol]);
      mma::mma_split3(acc[mt], a, b);
    }
    if (it + 1 < stages) {
      store_dz(zv, (it + 1) & 1);  // buffer (it + 1) & 1 was last read in iteration it - 1
      if (it + 2 < stages) load_dz(it + 2, zv);
    }
  }
  // the four token groups' sums, [token group][k][RL] in the x stages' bytes
  __syncthreads();  // every warp is past its last ldmatrix (no copies are pending: the last waited)
  float* red = smem;
  mma::store_tiles(acc, red + ((size_t)tg * KB + mg * 64) * RL, RL, lane);
  __syncthreads();
  for (int e = tid; e < KB * M; e += THREADS) {
    const int r = e / M, m = e % M, k = k0 + r;
    if (k >= K) continue;
    float v = 0.0f;
#pragma unroll
    for (int j = 0; j < TSTEPS; ++j) v += red[((size_t)j * KB + r) * RL + m];
    part[((size_t)s * K + k) * M + m] = v;
  }
}
