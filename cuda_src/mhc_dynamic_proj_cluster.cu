// The projection (z = vec(x) @ phi and the sum of squares, as mhc_dynamic_proj_tc) and x_in = h_pre . x
// (mhc_dynamic_pre) with x read from DRAM once, in thread block clusters (sm_90a; bfloat16 x and phi,
// n <= 4, C <= CLUSTER CW). The one-read kernels without clusters (mhc_dynamic_coeffs_pre,
// mhc_dynamic_proj_pre: groups of CTAs exchanging partials through global memory) hold a tile in
// shared memory ~13 us while the group's slowest CTA and two or three L2 round trips are awaited, and
// by Little's law that caps them near 2 TB/s (docs/HISTORY.md, sessions 32, 36 and 37). Here the CTAs
// that split a token's columns are one cluster: their partials meet through distributed shared
// memory behind one cluster barrier a tile.
//
// A cluster of CLUSTER CTAs; CTA rank k owns columns [k CW, k CW + CW) of every stream. Its 16 warps
// hold phi's rows j C + c for those columns as bfloat16 B fragments in registers for the whole launch
// (warp w: stream w / 4, k16 steps (w % 4) KW .. + KW of its columns; one term: phi is bfloat16). The
// cluster walks token tiles z = cluster, cluster + clusters, ... of TT tokens; tile i of a CTA (CW / 64
// TMA boxes of 64 columns x TT tokens x n streams, the 128-byte swizzle) lands in ring buffer i % RING.
// Per tile:
//   1. each warp multiplies its k16 steps of the tile on tensor cores (the sums of squares on the CUDA
//      cores from the same A fragments), the warps' sums meet in shared memory in warp order: the CTA's
//      partial [TT][RL] (z_0 .. z_{M-1}, zero-padded to MP, then the sum of squares) in cpart[i % 2];
//   2. the cluster barrier (arrive.release / wait.acquire): every rank's partial of tile i is visible;
//   3. thread r < TT sums token r's pre logits and sum of squares over the ranks in rank order and
//      forms h_pre exactly as mhc_dynamic_coeffs forms it from the same sums (so x_in here equals
//      mhc_dynamic_pre's from coeffs' h_pre, bit for bit); the threads of the tokens r % CLUSTER == k
//      write z and the sum of squares (the same sums) in proj_tc's format with one split, which
//      mhc_dynamic_coeffs turns into the coefficients;
//   4. x_in of the CTA's columns from the tile in shared memory (streams 0, 1, ...: mhc_dynamic_pre's
//      order), then thread 0 refills the buffer with tile i + RING.
// cpart[i % 2] is rewritten at tile i + 2 only after the cluster barrier of tile i + 1, which every rank
// passes only after its reads of tile i's partials (they come first in program order). No CTA exits
// while a peer may read its shared memory (a last cluster barrier).
//
// MLX launches it only with CUDA graphs off (MLX_USE_CUDA_GRAPHS=0): its graph cache does not key a
// kernel node by a compile-time cluster shape (see mhc_aot/dispatch.py, strategy `cluster`).
// Block: BLOCK threads. Grid (threads): (clusters CLUSTER BLOCK, 1, 1). Shared memory (dynamic): SMEM_BYTES.
// Inputs: x [T, n, C] bfloat16 (16-byte aligned), tmpl [32] uint32 (x's tensor-map template: dims
// (C, T, n), box (64, TT, n), 128-byte swizzle), phi [n C, M] bfloat16, b [M], alpha_pre [1].
// Outputs: x_in [T, C], part [1, T, M], sq [1, T] (float32), maps [grid CTAs 32] uint32 (scratch: each
// CTA's tensor map, mhc_tma.cuh).
#include "mhc_dynamic_common.cuh"
#include "mhc_dynamic_mma.cuh"
#include "mhc_tma.cuh"

using namespace mhc;

#ifndef MHC_PC_RING
#define MHC_PC_RING 3
#endif

namespace {
constexpr int CLUSTER = 8;                 // CTAs a cluster: the portable maximum
constexpr int TT = 16;                     // tokens a tile (one m16 tile)
constexpr int CW = 512;                    // columns of each stream a CTA owns
constexpr int NS = 4;                      // streams at most (M = n n + 2 n <= 24: three n8 tiles)
constexpr int NT = 3, MP = 8 * NT, RL = MP + 1;  // a partial row: M values (zero-padded to MP), the sum of squares
constexpr int BLOCK = 512, WARPS = BLOCK / 32;
constexpr int WPS = WARPS / NS;            // warps a stream
constexpr int KSTEPS = CW / 16, KW = KSTEPS / WPS;  // k16 steps a stream, a warp
constexpr int RING = MHC_PC_RING;
constexpr int BOXC = 64, BOXES = CW / BOXC;  // a box: one 128-byte swizzled line a (token, stream)
constexpr int BOX_BYTES = NS * TT * 128, X_BYTES = BOXES * BOX_BYTES;
constexpr int CSEGS = CW / 8;              // 16-byte segments of a stream's columns
constexpr int XITEMS = TT * CSEGS / BLOCK; // x_in items (token, segment) a thread a tile
constexpr int TM_BYTES = 128;
// shared memory past the 1024-byte aligned start: ring, the warps' sums, two partial buffers, h_pre,
// the tensor map, the ring's mbarriers
constexpr int RED_FLOATS = WARPS * TT * RL, CPART_FLOATS = TT * RL;
constexpr int SMEM_BYTES = 1024 + RING * X_BYTES + 4 * (RED_FLOATS + 2 * CPART_FLOATS + TT * NS) + TM_BYTES + 8 * RING;
static_assert(KSTEPS % WPS == 0 && WARPS % NS == 0, "whole k16 steps a warp");
static_assert(TT * CSEGS % BLOCK == 0, "whole x_in items a thread");
static_assert(X_BYTES % 1024 == 0, "buffers keep the 128-byte swizzle's 1024-byte alignment");
static_assert(TT * RL <= BLOCK, "a thread per partial element");
static_assert(SMEM_BYTES <= 232448, "Hopper's 227 KB a block");
static_assert(RING != 3 || SMEM_BYTES == 226840, "keep PC_SMEM_BYTES in mhc_aot/cuda_dynamic.py equal");

// byte offset of (token r, stream j, 8-column segment sg of the CTA's CW) in a tile buffer
__device__ __forceinline__ uint32_t tile_at(int r, int j, int sg) {
  return tma::swizzle128(((sg >> 3) * NS + j) * TT + r, sg & 7);
}
}  // namespace

// MHC_PC_RUNTIME_CLUSTER (scripts/probes/cluster_graph): no compile-time cluster shape; the launch gives it
#ifdef MHC_PC_RUNTIME_CLUSTER
#define PC_CLUSTER_DIMS
#else
#define PC_CLUSTER_DIMS __cluster_dims__(CLUSTER, 1, 1)
#endif
extern "C" __global__ void PC_CLUSTER_DIMS __launch_bounds__(BLOCK, 1) MHC_NAME(
    const bf16* __restrict__ x, const uint32_t* __restrict__ tmpl, const bf16* __restrict__ phi,
    const float* __restrict__ b, const float* __restrict__ alpha_pre, bf16* __restrict__ x_in,
    float* __restrict__ part, float* __restrict__ sq_out, uint32_t* maps, int n, int C, int Tn, float rms_eps,
    float pre_eps) {
  extern __shared__ float smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  base += (1024u - (tma::smem_addr(base) & 1023u)) & 1023u;
  unsigned char* ring = base;
  float* red = reinterpret_cast<float*>(base + RING * X_BYTES);  // [WARPS][TT][RL]
  float* cpart = red + RED_FLOATS;                                // [2][TT][RL]: read by the cluster's ranks
  float* hs = cpart + 2 * CPART_FLOATS;                           // [TT][NS]: h_pre of the tile's tokens
  uint32_t* tm = reinterpret_cast<uint32_t*>(hs + TT * NS);
  uint64_t* bars = reinterpret_cast<uint64_t*>(reinterpret_cast<unsigned char*>(tm) + TM_BYTES);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g4 = lane / 4, q = lane % 4;
  const int rank = blockIdx.x % CLUSTER, cl = blockIdx.x / CLUSTER, clusters = gridDim.x / CLUSTER;
  const int M = n * n + 2 * n, c0 = rank * CW, tiles = (Tn + TT - 1) / TT;
  const int mine = cl < tiles ? (tiles - cl + clusters - 1) / clusters : 0;  // tiles z = cl + i clusters
#ifndef MHC_EMULATED
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0) {
    if (tid == 0 && blockIdx.x == 0)
      printf("mhc_dynamic_proj_cluster: x is not 16-byte aligned (a view at an odd element offset); pass a copy of x\n");
    __trap();
  }
#endif
  uint32_t* gmap = maps + (size_t)blockIdx.x * 32;
  if (warp == 0) tma::publish_map(gmap, tm, tmpl, x, lane);
  if (tid == 0) {
    for (int k = 0; k < RING; ++k) tma::bar_init(bars + k, 1);
    tma::bar_init_fence();
  }
  __syncthreads();
  auto issue_tile = [&](int i) {  // tile i of this cluster: BOXES boxes of the CTA's columns
    const int t0 = (cl + i * clusters) * TT;
    unsigned char* dst = ring + (size_t)(i % RING) * X_BYTES;
    uint64_t* bar = bars + i % RING;
    tma::expect_tx(bar, BOXES * BOXC * TT * n * 2);  // out-of-range elements (past T, C) count too
#pragma unroll
    for (int bx = 0; bx < BOXES; ++bx) tma::load_3d(dst + bx * BOX_BYTES, gmap, bar, c0 + bx * BOXC, t0, 0);
  };
  if (tid == 0) {
    tma::acquire_map(gmap);
    for (int p = 0; p < RING && p < mine; ++p) issue_tile(p);
  }
  // phi's B fragments for this warp's stream js and k16 steps kq KW .. + KW of the CTA's columns (rows
  // 2q, 2q+1, 2q+8, 2q+9 of a step, column 8 nt + g4), zeros past C and M: registers for the launch
  const int js = warp / WPS, kq = warp % WPS;
  uint32_t bq[KW][NT][1][2];
#pragma unroll
  for (int k = 0; k < KW; ++k)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = nt * 8 + g4, r0 = c0 + (kq * KW + k) * 16 + 2 * q;
      bf16 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int c = r0 + (u & 1) + 8 * (u >> 1);
        v[u] = (js < n && c < C && m < M) ? phi[((size_t)js * C + c) * M + m] : from_float<bf16>(0.0f);
      }
      bq[k][nt][0][0] = mma::pack_bf16(v[0], v[1]);
      bq[k][nt][0][1] = mma::pack_bf16(v[2], v[3]);
    }
  const float a_pre = *alpha_pre;
  const bool vec = (reinterpret_cast<uintptr_t>(x_in) & 15) == 0;  // C % 8 == 0 (the launcher's rule)

  for (int i = 0; i < mine; ++i) {
    const int t0 = (cl + i * clusters) * TT;
    unsigned char* xb = ring + (size_t)(i % RING) * X_BYTES;
    tma::wait(bars + i % RING, (i / RING) & 1);  // tile i has landed and is visible
    // 1. this warp's k16 steps of the tile
    float acc[1][NT][4] = {}, sq[2] = {0.0f, 0.0f};  // sq: rows g4, g4 + 8
#ifdef MHC_PC_SKIP_PRODUCT  // timing only (the MHC_PC_SKIP_* defines give wrong outputs by design)
    if (false) {
#else
    if (js < n) {
#endif
#pragma unroll
      for (int k = 0; k < KW; ++k) {
        uint32_t a[4];
        mma::ldmatrix_x4<false>(a, xb + tile_at(lane % 16, js, 2 * (kq * KW + k) + lane / 16));
        mma::mma_terms<NT, 1>(acc[0], a, bq[k]);
        sq[0] += mma::sq_pair(a[0]) + mma::sq_pair(a[2]);
        sq[1] += mma::sq_pair(a[1]) + mma::sq_pair(a[3]);
      }
    }
    float* wsum = red + (size_t)warp * TT * RL;
    mma::store_tiles<1, NT>(acc, wsum, RL, lane);
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) sq[u] += __shfl_xor_sync(0xffffffffu, sq[u], o);  // over q
    if (q == 0) {
      wsum[(size_t)g4 * RL + MP] = sq[0];
      wsum[(size_t)(g4 + 8) * RL + MP] = sq[1];
    }
    __syncthreads();  // the warps' sums are in red
    float* mypart = cpart + (size_t)(i & 1) * CPART_FLOATS;
    if (tid < TT * RL) {  // the CTA's partial: the warps' sums in warp order (warps of streams past n hold zeros)
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) v += red[(size_t)w * TT * RL + tid];
      mypart[tid] = v;
    }
    // 2. every rank's partial of tile i is visible after this
#ifndef MHC_PC_SKIP_BARRIER
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
#else
    __syncthreads();
#endif
    // 3. token r's sums over the ranks, in rank order: h_pre as mhc_dynamic_coeffs forms it from one
    // split (zp = 0 + z, ss = 0 + sum of squares), and z and the sum of squares of this rank's tokens
    if (tid < TT) {
      const int r = tid, t = t0 + r;
      float z[NS] = {}, ss = 0.0f;
#ifdef MHC_PC_SKIP_SUMS
      for (int k = 0; k < 1; ++k) {
        const float* pk = mypart + (size_t)r * RL;
#else
      for (int k = 0; k < CLUSTER; ++k) {
        const float* pk = static_cast<const float*>(__cluster_map_shared_rank(mypart, k)) + (size_t)r * RL;
#endif
        ss += pk[MP];
#pragma unroll
        for (int j = 0; j < NS; ++j)
          if (j < n) z[j] += pk[j];
      }
      const float invr = rsqrtf(ss / (float)(n * C) + rms_eps);
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        const float vp = z[j] * invr;
        hs[r * NS + j] = j < n ? sigmoid(vp * a_pre + b[j]) + pre_eps : 0.0f;
      }
      if (r % CLUSTER == rank && t < Tn) sq_out[t] = ss;
    }
#ifndef MHC_PC_SKIP_SUMS
    if (tid >= 32 && tid < 32 + TT * MP) {  // z of this rank's tokens: element (r, m), m < M
      const int e = tid - 32, r = e / MP, m = e % MP, t = t0 + r;
      if (m < M && r % CLUSTER == rank && t < Tn) {
        float v = 0.0f;
        for (int k = 0; k < CLUSTER; ++k)
          v += static_cast<const float*>(__cluster_map_shared_rank(mypart, k))[(size_t)r * RL + m];
        part[(size_t)t * M + m] = v;
      }
    }
#endif
    __syncthreads();  // hs is written
    // 4. x_in of the CTA's columns: item e = (token e / CSEGS, segment e % CSEGS), streams 0, 1, ... in
    // float32 (mhc_dynamic_pre's order and rounding)
#ifndef MHC_PC_SKIP_XIN
#pragma unroll
    for (int u = 0; u < XITEMS; ++u) {
      const int e = tid + u * BLOCK, r = e / CSEGS, sg = e % CSEGS, t = t0 + r, c = c0 + 8 * sg;
      float xa[8] = {};
#pragma unroll
      for (int j = 0; j < NS; ++j)
        if (j < n) dyn::fma8_bf16(xa, *reinterpret_cast<const uint4*>(xb + tile_at(r, j, sg)), hs[r * NS + j]);
      if (t < Tn && c < C) dyn::store8_bf16(x_in + (size_t)t * C + c, xa, c, C, vec);
    }
#endif
    __syncthreads();  // the buffer is consumed (and hs and red free again)
    if (tid == 0 && i + RING < mine) issue_tile(i + RING);
  }
  // no CTA exits while a peer may still read its partials
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
}
