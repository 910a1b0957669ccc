// Shared by every mhc-aot Metal kernel: element types, W-wide loads with float32 math, simdgroup
// and threadgroup reductions, and the compile-time constants of the variant table
// (build_tools/variants.py). Mirrors cuda_src/mhc_common.cuh.
//
// Variant macros, set by build_tools/metal.py: MHC_NAME (the variant), MHC_ENTRY (the kernel's
// function name, the one MLX's mx.fast.metal_kernel looks up: custom_kernel_<MHC_NAME>_<types>),
// MHC_DTYPE (f32 | f16 | bf16: the type of x, out and their gradients; parameters are always
// float32) and MHC_NMAX (compile-time upper bound on n so loops over streams unroll; 0 = generic).
//
// MLX calling convention (mx.fast.metal_kernel, see mhc_aot/metal.py): buffers bound in call
// order, inputs first, then outputs. Metal kernels take no scalar arguments there, so the CUDA
// signature's scalar tail (int n, int C, float eps, ...) arrives as one more input after the
// CUDA inputs: the int32 array `scalars` (>= 8 slots), read through `struct Scalars` whose fields
// are the CUDA scalars in order. Grid and threadgroup are given in threads, as on CUDA.
//
// Differences from the CUDA dialect, all forced by Metal or by MLX's Metal primitive:
//  - threadgroup memory is declared in the kernel with a static size (MLX's metal_kernel has no
//    dynamic threadgroup-memory argument, and Apple GPUs allow 32 KB): parameters are staged
//    for n <= NMAX; the generic kernel reads M in place and serves n <= GENERIC_N_LIMIT;
//  - the token passes keep agg (and in the backward g) in registers and recompute it where the
//    CUDA kernels keep C floats in shared memory (C is unbounded, 32 KB is not);
//  - no lambdas in Metal: the per-pass steps are functor structs;
//  - a "vector" is VEC = 4 consecutive elements read with scalar loads (Metal vectors are at
//    most 4 wide and MLX buffers carry no alignment promise), so the vector path needs only
//    C % VEC == 0.
#pragma once

#include <metal_stdlib>

using namespace metal;

#ifndef MHC_NMAX
#define MHC_NMAX 0
#endif

namespace mhc {
// Internal linkage: every variant of a source is compiled with different macros and all of them
// are linked into one metallib; nothing but the MHC_ENTRY kernels may be visible across them.
namespace {

typedef float f32;
typedef half f16;
typedef bfloat bf16;

#ifdef MHC_DTYPE
typedef MHC_DTYPE T;
#endif

constant constexpr int NMAX = MHC_NMAX;

// Threads per threadgroup of the token kernels (the launcher's threadgroup size); Apple GPUs
// run simdgroups of 32 threads. Pass-2 work items put IB output rows of one column vector in
// registers, so every x load feeds IB * VEC fused multiply-adds.
constant constexpr int THREADS = 256;
constant constexpr int SIMD = 32;
constant constexpr int NSIMD = THREADS / SIMD;
constant constexpr int IB = (NMAX == 0 || NMAX >= 8) ? 8 : NMAX;
constant constexpr int VEC = 4;

// Streams the generic (NMAX 0) kernels can hold per-stream values for in threadgroup memory;
// the launcher sends larger n to the portable path with an error that says so.
constant constexpr int GENERIC_N_LIMIT = 256;
// Upper bound on n for this variant, and its IB-padded row count.
constant constexpr int NCAP = NMAX > 0 ? NMAX : GENERIC_N_LIMIT;
constant constexpr int PADCAP = (NCAP + IB - 1) / IB * IB;
// Apple GPUs give a threadgroup 32 KB; kernels static_assert their arrays against it.
constant constexpr int TG_FLOATS_MAX = 32768 / 4;

// The position of this thread (CUDA's threadIdx.x, lane and warp), passed to every helper.
struct Tid {
  uint tid;   // [[thread_index_in_threadgroup]]
  uint lane;  // [[thread_index_in_simdgroup]]
  uint sg;    // [[simdgroup_index_in_threadgroup]]
};

inline float to_float(float v) { return v; }
inline float to_float(half v) { return static_cast<float>(v); }
inline float to_float(bfloat v) { return static_cast<float>(v); }

// Round to E (nearest even).
template <typename E>
inline E from_float(float v) {
  return static_cast<E>(v);
}

// W consecutive elements, widened to float32.
template <typename E, int W>
inline void load_w(device const E* p, thread float (&v)[W]) {
  for (int k = 0; k < W; ++k) v[k] = to_float(p[k]);
}

template <typename E, int W>
inline void store_w(device E* p, thread const float (&v)[W]) {
  for (int k = 0; k < W; ++k) p[k] = from_float<E>(v[k]);
}

// The VEC-wide path needs a work item's columns inside one row; odd C takes the scalar path.
inline bool vec_ok(int C) { return C % VEC == 0; }

inline float sigmoid(float v) { return 1.0f / (1.0f + precise::exp(-v)); }

// Sum over the threadgroup; every thread gets the total. `scratch` holds NSIMD floats.
// Ends synchronised.
inline float block_sum(float v, threadgroup float* scratch, Tid t) {
  v = simd_sum(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);  // scratch may still be read by a previous call
  if (t.lane == 0) scratch[t.sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  v = t.lane < uint(NSIMD) ? scratch[t.lane] : 0.0f;
  return simd_sum(v);
}

// Orders device and threadgroup memory within the threadgroup (kernels whose working set may
// live in either).
inline void sync_all() {
  threadgroup_barrier(mem_flags::mem_device);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Loop bound over streams: with a compile-time bound NM (> 0) the loop has a constant trip
// count and unrolls (bodies test j < n); NM = 0 keeps it rolled over n.
template <int NM>
inline int stream_bound(int n) {
  return NM > 0 ? NM : n;
}

}  // namespace
}  // namespace mhc
