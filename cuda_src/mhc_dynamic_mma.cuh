// CUDA-only warp-level pieces of the tensor-core kernels: the dynamic-mHC projection kernels
// (mhc_dynamic_proj_tc, mhc_dynamic_dphi_tc), the static forward's mix (mhc_forward_fused,
// _cluster, _ring) and the rings' backward (mhc_backward_ring), plus the rings' exact cp.async
// wait: mma.sync m16n8k16 bfloat16 -> float32 and ldmatrix, as PTX, the float32 B operand split into
// three bfloat16 terms in fragment order (which both dynamic kernels stage) and the static M split
// into two as A fragments. Fragment
// layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, q = lane % 4:
//   A 16 x 16: a[0] = (row g, cols 2q, 2q+1)  a[1] = (row g+8, cols 2q, 2q+1)
//              a[2] = (row g, cols 2q+8, +9)  a[3] = (row g+8, cols 2q+8, +9)
//   B 16 x 8:  b[0] = (rows 2q, 2q+1, col g)  b[1] = (rows 2q+8, 2q+9, col g)
//   C/D 16 x 8: d[0], d[1] = (row g, cols 2q, 2q+1)  d[2], d[3] = (row g+8, cols 2q, 2q+1)
// Each 32-bit register holds two bfloat16, the lower index in the low half. The CPU emulation
// (mhc_dynamic_emulate.h, tests only) defines MHC_EMULATED and implements the same three calls.
#pragma once

#include <cuda_pipeline.h>

#include "mhc_dynamic_common.cuh"

namespace mhc {
namespace mma {

#ifndef MHC_EMULATED
// d += A B for one 16 x 8 x 16 tile
__device__ __forceinline__ void bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 bfloat16 matrices from shared memory: lane l gives the address of row l % 8 of
// matrix l / 8 (16 contiguous bytes); r[j] is matrix j in the A/B register layout above
// (lane l holds row l / 4, columns 2 (l % 4), +1). `trans`: each matrix transposed on the way.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}
#endif

// The squares of a register's two bfloat16 (an A fragment's pair), summed in float32: the one-read
// kernels' sums of squares on the CUDA cores from the A fragments of their product.
__device__ __forceinline__ float sq_pair(uint32_t v) {
  const float lo = __uint_as_float(v << 16), hi = __uint_as_float(v & 0xffff0000u);
  return lo * lo + hi * hi;
}

// Two bfloat16 in one register, lo in the low half (the lower row / column index).
__device__ __forceinline__ uint32_t pack_bf16(bf16 lo, bf16 hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return uint32_t(l) | (uint32_t(h) << 16);
}

// A (16 MT) x (16 KT) float32 matrix, value(row, col, u) = element (row, col + u), u in {0, 1} (a
// register's pair), as A fragments split in two bfloat16 terms:
// a[0] = bf16(v), a[1] = bf16(v - a[0]) (2^-17 relative together, far below a bfloat16 output's
// rounding); a[term][mt][kt] is the m16 x k16 tile (mt, kt). The MMAs take the lo term first.
template <int MT, int KT, typename Value>
__device__ __forceinline__ void split_a_tiles(uint32_t (&a)[2][MT][KT][4], int lane, Value value) {
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kt = 0; kt < KT; ++kt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = mt * 16 + g + 8 * (e & 1), col = kt * 16 + 2 * q + 8 * (e >> 1);
        bf16 h[2], l[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const float v = value(row, col, u);
          h[u] = from_float<bf16>(v);
          l[u] = from_float<bf16>(v - to_float(h[u]));
        }
        a[0][mt][kt][e] = pack_bf16(h[0], h[1]);
        a[1][mt][kt][e] = pack_bf16(l[0], l[1]);
      }
}

// The static forward's mixing matrix M (float32 [N, N], row-major) as split A fragments for a whole
// token: the tensor-core mix of mhc_forward_fused, _cluster and _ring (mix_group16).
template <int N, bool GLOBAL = true>  // GLOBAL: M in global memory (read through the read-only path)
__device__ __forceinline__ void split_a_fragments(const float* __restrict__ M, uint32_t (&a)[2][N / 16][N / 16][4],
                                                  int lane) {
  split_a_tiles<N / 16, N / 16>(a, lane, [&](int row, int col, int u) {
    return GLOBAL ? __ldg(M + row * N + col + u) : M[row * N + col + u];
  });
}

// d = M x for one 16-column group of a token (the static forward's mix, paper eq. 3): row j of the
// group's x (two 16-byte segments) is read by ldmatrix.trans through row_at(j), which gives the
// segment holding this lane's ldmatrix row (segment lane / 16 of row j); a from split_a_fragments,
// lo term first. d[mt][nt]: rows 16 mt.., columns 8 nt.. of the group (C/D layout above).
template <int N, typename RowAt>
__device__ __forceinline__ void mix_group16(float (&d)[N / 16][2][4], const uint32_t (&a)[2][N / 16][N / 16][4],
                                            int lane, RowAt row_at) {
  const int lrow = (lane & 7) + 8 * ((lane >> 3) & 1);  // matrices (k rows 0-7 | 8-15) x (segment 0 | 1)
#pragma unroll
  for (int mt = 0; mt < N / 16; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) d[mt][nt][e] = 0.0f;
#pragma unroll
  for (int kt = 0; kt < N / 16; ++kt) {
    uint32_t b[4];  // {b0, b1} of the group's first n8 tile, then of its second
    ldmatrix_x4<true>(b, row_at(kt * 16 + lrow));
#pragma unroll
    for (int mt = 0; mt < N / 16; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        bf16_16816(d[mt][nt], a[1][mt][kt], b[2 * nt], b[2 * nt + 1]);  // lo first
        bf16_16816(d[mt][nt], a[0][mt][kt], b[2 * nt], b[2 * nt + 1]);
      }
  }
}

// hpost[i] for the C/D row i = 16 mt + g + 8 h of a lane: read from a shared array, or held in the
// lane's registers as hp[mt][h] (mhc_forward_ring: no shared load a group)
__device__ __forceinline__ float hpost_row(const float* hpost, int, int, int i) { return hpost[i]; }
template <int MT>
__device__ __forceinline__ float hpost_row(const float (&hp)[MT][2], int mt, int h, int) { return hp[mt][h]; }

// The group's outputs d + hpost[i] y as bfloat16 pairs: store(i, nt, word) gets row i's columns
// 8 nt + 2q, + 1 of the group packed in one word; y(nt) gives y at those two columns.
template <int N, typename HP, typename Y, typename Store>
__device__ __forceinline__ void add_post_pairs(const float (&d)[N / 16][2][4], const HP& hpost, int lane, Y y,
                                               Store store) {
  const int g = lane >> 2;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const float2 yv = y(nt);
#pragma unroll
    for (int mt = 0; mt < N / 16; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = mt * 16 + g + 8 * h;
        const float hp = hpost_row(hpost, mt, h, i);
        store(i, nt, pack_bf16(from_float<bf16>(d[mt][nt][2 * h] + hp * yv.x),
                               from_float<bf16>(d[mt][nt][2 * h + 1] + hp * yv.y)));
      }
  }
}

// Row j's 16-byte segment s of a bfloat16 tile in shared memory with `pitch` elements a row, stored
// at segment s ^ (j & 7): the eight rows an ldmatrix phase reads sit in eight bank groups.
__device__ __forceinline__ bf16* swizzled_segment(bf16* tile, int pitch, int j, int s) {
  return tile + j * pitch + ((s ^ (j & 7)) * 8);
}

// A warp's 16-column group of a token in shared memory, row j's 16-byte segment s (s = 0, 1) at
// seg(j, s): d = M x on tensor cores, d + hpost y written back over the consumed x, then the N rows
// stored to out (row stride C, the group's first column) as 32 contiguous bytes a row: whole
// sectors, not the 4-byte pieces of the C/D layout. hpost: see hpost_row. mix_back_rows stops
// before the stores (mhc_forward_ring stores several groups' rows at once).
template <int N, typename Seg, typename HP, typename Y>
__device__ __forceinline__ void mix_back_rows(const uint32_t (&a)[2][N / 16][N / 16][4], Seg seg, const HP& hpost, Y y,
                                              int lane) {
  const int q = lane & 3;
  float d[N / 16][2][4];
  mix_group16<N>(d, a, lane, [&](int j) { return seg(j, lane >> 4); });
  __syncwarp();  // every lane's ldmatrix of the group is done: its x may be overwritten
  add_post_pairs<N>(d, hpost, lane, y, [&](int i, int nt, uint32_t word) {
    *reinterpret_cast<uint32_t*>(seg(i, nt) + 2 * q) = word;
  });
}

// N rows of SEGS 16-byte segments (seg(i, s)) stored to out (row stride C): SEGS lanes a row, whole
// sectors. Unrolled by 2 beyond two segments a row (fully unrolled, mhc_forward_ring's 8 at
// n = 32 took 128 registers and spilled).
template <int N, int SEGS, typename Seg>
__device__ __forceinline__ void store_rows(Seg seg, bf16* out, int C, int lane) {
  static_assert(SEGS == 2 || SEGS == 4 || SEGS == 8, "a row of 2, 4 or 8 segments");
  constexpr int SHIFT = SEGS == 2 ? 1 : SEGS == 4 ? 2 : 3;
  auto store = [&](int e) {
    const int i = e >> SHIFT, s = e & (SEGS - 1);
    *reinterpret_cast<uint4*>(out + (size_t)i * C + 8 * s) = *reinterpret_cast<const uint4*>(seg(i, s));
  };
  if constexpr (SEGS == 2) {
#pragma unroll
    for (int e = lane; e < SEGS * N; e += 32) store(e);
  } else {
#pragma unroll 2
    for (int e = lane; e < SEGS * N; e += 32) store(e);
  }
}

template <int N, typename Seg, typename HP, typename Y>
__device__ __forceinline__ void mix_store_rows(const uint32_t (&a)[2][N / 16][N / 16][4], Seg seg, const HP& hpost,
                                               Y y, bf16* out, int C, int lane) {
  mix_back_rows<N>(a, seg, hpost, y, lane);
  __syncwarp();
  store_rows<N, 2>(seg, out, C, lane);
}

// mix_store_rows for a group held in a swizzled tile (segments seg0, seg0 + 1 of its N rows):
// mhc_forward_cluster and mhc_backward_ring.
template <int N, typename Y>
__device__ __forceinline__ void mix_store_group(const uint32_t (&a)[2][N / 16][N / 16][4], bf16* tile, int pitch,
                                                int seg0, const float* hpost, Y y, bf16* out, int C, int lane) {
  mix_store_rows<N>(a, [&](int j, int s) { return swizzled_segment(tile, pitch, j, seg0 + s); }, hpost, y, out, C,
                    lane);
}

// v[0..3] = the four float32 values of one B-fragment lane (rows 2q, 2q+1, 2q+8, 2q+9 of its
// column), each split as hi + mid + lo (dyn::split_bf16x3): out[p] is term p's register pair
// {b0, b1}. Three MMAs with float32 accumulation then multiply by v exactly.
__device__ __forceinline__ void split_b_fragment(const float (&v)[4], uint2 (&out)[3]) {
  bf16 t[3][4];
#pragma unroll
  for (int e = 0; e < 4; ++e) dyn::split_bf16x3(v[e], t[0][e], t[1][e], t[2][e]);
#pragma unroll
  for (int p = 0; p < 3; ++p) out[p] = make_uint2(pack_bf16(t[p][0], t[p][1]), pack_bf16(t[p][2], t[p][3]));
}

// One pipeline stage of a float32 B operand [rows, M] (phi in the projection, dz in dphi) as the
// MMAs read it: STEPS k16 steps x NT n8 tiles x 32 lanes, each lane's four values (rows 2q, 2q+1,
// 2q+8, 2q+9 of its k16 step, column 8 nt + g) split into TERMS bfloat16 register pairs (three:
// float32-exact; one: an operand that is bfloat16 already, such as a bfloat16 phi), stored
// [step][tile][term][lane] (8 bytes each) so that a warp's load of one (step, tile, term) is 256
// contiguous bytes. A CTA of THREADS_ threads fills it (three terms): thread tid owns slots tid + i THREADS_.
template <int STEPS, int NT, int THREADS_, int TERMS = 3>
struct BStage {
  static_assert(TERMS == 1 || TERMS == 3, "one bfloat16 term (a bfloat16 operand) or three (float32)");
  static constexpr int SLOTS = STEPS * NT * 32;
  static constexpr int PER_THREAD = (SLOTS + THREADS_ - 1) / THREADS_;
  static constexpr int BYTES = SLOTS * TERMS * 8;

  // this thread's slot values of rows [row0, row0 + 16 STEPS) of src (zeros from row_end and M on)
  static __device__ __forceinline__ void load(float (&v)[PER_THREAD][4], const float* __restrict__ src, int row0,
                                              int row_end, int M, int tid) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int e = tid + i * THREADS_, l = e % 32, nt = (e / 32) % NT, kk = e / (32 * NT);
      const int m = nt * 8 + l / 4, r0 = row0 + kk * 16 + 2 * (l % 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = r0 + (j & 1) + 8 * (j >> 1);
        v[i][j] = (e < SLOTS && m < M && r < row_end) ? __ldg(src + (size_t)r * M + m) : 0.0f;
      }
    }
  }
  // split and store what load gave into the stage buffer dst (BYTES)
  static __device__ __forceinline__ void store(const float (&v)[PER_THREAD][4], uint2* dst, int tid) {
    static_assert(TERMS == 3, "store splits float32 values in three terms");
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int e = tid + i * THREADS_;
      if (e >= SLOTS) continue;
      const int l = e % 32, rest = e / 32;  // rest = kk * NT + nt
      uint2 terms[3];
      split_b_fragment(v[i], terms);
#pragma unroll
      for (int p = 0; p < 3; ++p) dst[(rest * 3 + p) * 32 + l] = terms[p];
    }
  }
  // a warp's B registers of k16 step kk: b[tile][term] = {b0, b1}
  static __device__ __forceinline__ void fragments(uint32_t (&b)[NT][TERMS][2], const uint2* src, int kk, int lane) {
    const uint2* p0 = src + kk * NT * TERMS * 32 + lane;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int p = 0; p < TERMS; ++p) {
        const uint2 u = p0[(nt * TERMS + p) * 32];
        b[nt][p][0] = u.x;
        b[nt][p][1] = u.y;
      }
  }
};

// d[mt][nt] += A[mt] B[nt], B's TERMS split terms summed smallest first (hi + mid + lo: lo first)
template <int NT, int TERMS>
__device__ __forceinline__ void mma_terms(float (&d)[NT][4], const uint32_t (&a)[4], const uint32_t (&b)[NT][TERMS][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int p = TERMS - 1; p >= 0; --p) bf16_16816(d[nt], a, b[nt][p][0], b[nt][p][1]);
}

// d[mt][nt] += A[mt] (hi + mid + lo)[nt]: the three split terms, lo first
template <int NT>
__device__ __forceinline__ void mma_split3(float (&d)[NT][4], const uint32_t (&a)[4], const uint32_t (&b)[NT][3][2]) {
  mma_terms<NT, 3>(d, a, b);
}

// A warp's MT x NT accumulator tiles into rows [16 mt, 16 mt + 16) x columns [0, 8 NT) of out
// (ld floats per row).
template <int MT, int NT>
__device__ __forceinline__ void store_tiles(const float (&acc)[MT][NT][4], float* out, int ld, int lane) {
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float* lo = out + (size_t)(mt * 16 + g) * ld;
    float* hi = lo + 8 * ld;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * q;
      lo[c] = acc[mt][nt][0];
      lo[c + 1] = acc[mt][nt][1];
      hi[c] = acc[mt][nt][2];
      hi[c + 1] = acc[mt][nt][3];
    }
  }
}

// Waits until at most `pending` of this thread's cp.async groups are in flight. The PTX wants an
// immediate: a binary search over [LO, HI] (five uniform branches for 0..31; more pending than 31
// waits for 31, which only waits longer). Exact, so a ring kernel starts on a chunk as soon as it
// lands. (mhc_forward_ring's first version chained 32 branches down from 31: ~13% of its issue
// slots on the H200, ncu source counters.) mhc_forward_ring and mhc_backward_ring.
template <int LO = 0, int HI = 31>
__device__ __forceinline__ void wait_pending(int pending) {
  if constexpr (LO == HI) {
    __pipeline_wait_prior(LO);
  } else {
    constexpr int MID = (LO + HI) / 2;
    if (pending <= MID) {
      wait_pending<LO, MID>(pending);
    } else {
      wait_pending<MID + 1, HI>(pending);
    }
  }
}

}  // namespace mma
}  // namespace mhc
