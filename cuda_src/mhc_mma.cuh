// Warp-level tensor-core primitives of the dynamic-mHC projection kernels (mhc_dynamic_proj_tc,
// mhc_dynamic_dphi_tc): mma.sync m16n8k16 bfloat16 -> float32 and ldmatrix, as PTX. Fragment
// layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, q = lane % 4:
//   A 16 x 16: a[0] = (row g, cols 2q, 2q+1)  a[1] = (row g+8, cols 2q, 2q+1)
//              a[2] = (row g, cols 2q+8, +9)  a[3] = (row g+8, cols 2q+8, +9)
//   B 16 x 8:  b[0] = (rows 2q, 2q+1, col g)  b[1] = (rows 2q+8, 2q+9, col g)
//   C/D 16 x 8: d[0], d[1] = (row g, cols 2q, 2q+1)  d[2], d[3] = (row g+8, cols 2q, 2q+1)
// Each 32-bit register holds two bfloat16, the lower index in the low half. The CPU emulation
// (mhc_dynamic_emulate.h, tests only) defines MHC_EMULATED and implements the same three calls.
#pragma once

#include "mhc_common.cuh"

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

// Two bfloat16 in one register, lo in the low half (the lower row / column index).
__device__ __forceinline__ uint32_t pack_bf16(bf16 lo, bf16 hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return uint32_t(l) | (uint32_t(h) << 16);
}

// v[0..3] = the four float32 values of one B-fragment lane (rows 2q, 2q+1, 2q+8, 2q+9 of its
// column), split as v = hi + mid + lo (exact to 2^-24 relative, see dyn::split_bf16x3): out[p] is
// term p's register pair {b0, b1}. Three MMAs with float32 accumulation then multiply by v exactly.
__device__ __forceinline__ void split_b_fragment(const float (&v)[4], uint2 (&out)[3]) {
  bf16 t[3][4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    t[0][e] = from_float<bf16>(v[e]);
    const float r1 = v[e] - to_float(t[0][e]);
    t[1][e] = from_float<bf16>(r1);
    t[2][e] = from_float<bf16>(r1 - to_float(t[1][e]));
  }
#pragma unroll
  for (int p = 0; p < 3; ++p) out[p] = make_uint2(pack_bf16(t[p][0], t[p][1]), pack_bf16(t[p][2], t[p][3]));
}

}  // namespace mma
}  // namespace mhc
