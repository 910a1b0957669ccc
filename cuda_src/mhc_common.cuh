// Shared by every mhc-aot CUDA kernel: element types, 16-byte vector I/O with float32 math,
// block reductions, and the compile-time constants of the variant table (build_tools/variants.py).
// Mirrored by metal_src/mhc_common.h.
//
// Variant macros, set by build_tools/cuda.py: MHC_NAME (the extern "C" entry point),
// MHC_DTYPE (f32 | f16 | bf16: the type of x, out and their gradients; parameters are always
// float32) and MHC_NMAX (compile-time upper bound on n so loops over streams unroll; 0 = generic).
//
// MLX calling convention (mx.fast.precompiled_cuda_kernel): input pointers, output pointers,
// then scalars; the grid is given in threads; dynamic shared memory comes from `shared_memory=`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace mhc {

using f32 = float;
using f16 = __half;
using bf16 = __nv_bfloat16;

#ifdef MHC_DTYPE
using T = MHC_DTYPE;
#endif
#ifndef MHC_NMAX
#define MHC_NMAX 0
#endif
constexpr int NMAX = MHC_NMAX;

// Threads per CTA of the token kernels; pass-2 work items put IB output rows of one 16-byte
// column vector in registers, so every x load feeds IB * VEC fused multiply-adds.
constexpr int THREADS = 256;
constexpr int IB = (NMAX == 0 || NMAX >= 8) ? 8 : NMAX;

template <typename E>
struct Vec {
  static constexpr int N = 16 / sizeof(E);  // elements per 16-byte load: 4 (f32) or 8 (f16, bf16)
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename E>
__device__ __forceinline__ E from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One 16-byte load of Vec<E>::N elements, raw: issue a thread's loads first, widen them later.
template <typename E>
__device__ __forceinline__ uint4 ldg_vec(const E* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The Vec<E>::N elements of a raw 16-byte vector, widened to float32.
template <typename E>
__device__ __forceinline__ void widen_vec(const uint4& raw, float (&v)[Vec<E>::N]) {
  const E* e = reinterpret_cast<const E*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec<E>::N; ++k) v[k] = to_float(e[k]);
}

// One 16-byte load of Vec<E>::N elements, widened to float32.
template <typename E>
__device__ __forceinline__ void load_vec(const E* p, float (&v)[Vec<E>::N]) {
  widen_vec<E>(ldg_vec(p), v);
}

// Round to E (nearest even) and store 16 bytes.
template <typename E>
__device__ __forceinline__ void store_vec(E* p, const float (&v)[Vec<E>::N]) {
  uint4 raw;
  E* e = reinterpret_cast<E*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec<E>::N; ++k) e[k] = from_float<E>(v[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// The 16-byte path needs C to be a multiple of the vector width and every row base aligned;
// anything else (odd C, an offset view) takes the scalar path of the same kernel.
template <typename E>
__device__ __forceinline__ bool vec_ok(int C, const void* a, const void* b, const void* c = nullptr) {
  const uintptr_t mask = 15;
  return C % Vec<E>::N == 0 && ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                                 reinterpret_cast<uintptr_t>(c)) & mask) == 0;
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the CTA; every thread gets the total. `scratch` holds 32 floats. Ends synchronised.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

// N (2 or 4) floats of shared memory, 8- or 16-byte aligned, in one load that the compiler may
// neither hoist out of a loop nor merge with another: parameters read per token this way do not
// stay live across the token loop, where the resident kernels need the registers for the token
// (ptxas, mhc_forward_resident bf16 n = 4: 80 bytes of spills with hoisted parameters).
template <int N>
__device__ __forceinline__ void lds_fresh(const float* p, float (&v)[N]) {
  static_assert(N == 2 || N == 4, "lds_fresh loads 2 or 4 floats");
#ifdef MHC_EMULATED
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = p[j];
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (N == 4) {
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3]) : "r"(a));
  } else {
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v[0]), "=f"(v[1]) : "r"(a));
  }
#endif
}

// Element k of a packed register word array (16-bit types two per word), widened to float.
template <typename E>
__device__ __forceinline__ float widen(const unsigned* words, int k) {
  return to_float(reinterpret_cast<const E*>(words)[k]);
}

// widen, by an instruction the compiler may not share with another widening of the same value: the
// resident forward keeps a token packed (half the registers) across its RMS barrier and widens at
// each use; shared widenings would keep float copies live and spill (ptxas, bf16 n = 4).
template <typename E>
__device__ __forceinline__ float widen_fresh(const unsigned* words, int k) {
#ifdef MHC_EMULATED
  return widen<E>(words, k);
#else
  if constexpr (sizeof(E) == 4) {
    return widen<E>(words, k);
  } else {
    const unsigned u = words[k / 2];
    float v;
    if constexpr (__is_same(E, __nv_bfloat16)) {
      const unsigned bits = k % 2 ? u & 0xffff0000u : u << 16;
      asm volatile("mov.b32 %0, %1;" : "=f"(v) : "r"(bits));
    } else {
      const unsigned short h = k % 2 ? u >> 16 : u & 0xffffu;
      asm volatile("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
    }
    return v;
  }
#endif
}

// block_sum with one barrier, for kernels that sum once per token in a loop: `scratch` holds two
// 32-float halves used by token parity, so a half is rewritten only after the next token's
// barrier, which every reader of it has passed. Every thread gets the same bits (xor butterfly).
__device__ __forceinline__ float block_sum_once(float v, float* scratch, int parity) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  float* s = scratch + 32 * parity;
  v = warp_sum(v);
  if (lane == 0) s[warp] = v;
  __syncthreads();
  return warp_sum(lane < nwarps ? s[lane] : 0.0f);
}

// Calls body(j) for streams j = 0..n-1. With a compile-time bound NM (> 0) the loop unrolls by
// up to 8 (enough independent loads in flight without bloating the binary); NM = 0 keeps it
// rolled: scalar paths use that, because MLX hashes a kernel's whole binary on every launch.
template <int NM, typename Body>
__device__ __forceinline__ void for_streams(int n, Body body) {
  if constexpr (NM > 0) {
#pragma unroll 8
    for (int j = 0; j < NM; ++j) {
      if (j < n) body(j);
    }
  } else {
#pragma unroll 1
    for (int j = 0; j < n; ++j) body(j);
  }
}

}  // namespace mhc
