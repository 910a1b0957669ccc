// CPU emulation of the CUDA subset that the dynamic-mHC kernels (mhc_dynamic_*.cu) and
// mhc_common.cuh use, for tests on machines without a GPU (tests/test_dynamic.py compiles each
// kernel with g++ -include this file and runs it through a fake mx.fast.precompiled_cuda_kernel).
// Not part of any GPU build (a .h, so build_tools/cuda.py neither compiles nor hashes it).
//
// Semantics: one CTA at a time (one thread block cluster at a time for a kernel declared with
// __cluster_dims__, the whole grid at once for a persistent kernel whose CTAs wait on each other's
// global counters: tests/cuda_emulation.py passes the grid as the cluster), its threads fibers run
// round-robin (a spin-wait yields); bar.sync / bar.arrive id, count are emu_named_sync / _arrive;
// __syncthreads is a barrier over the CTA, warp shuffles exchange through a per-warp buffer between
// two warp barriers, the cluster barrier
// spans the cluster's CTAs; a thread that returns drops out of all three (as an exited GPU thread
// does); __shared__ variables are function statics (shared by the threads of a launch: cluster
// kernels use dynamic shared memory only); dynamic shared memory is one buffer per CTA of a
// cluster, reused by the next cluster. __half / __nv_bfloat16 are 16-bit storage with round-to-nearest-even.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include <cmath>
#include <deque>
#include <functional>
#include <map>
#include <type_traits>
#include <vector>

#include "emu_fiber.h"  // tests/: the fibers (GPU threads) and the switch between them

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__
#define __cluster_dims__(...)

using std::max;
using std::min;

struct emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline emu_dim3 threadIdx, blockIdx;  // set by the scheduler before it resumes a thread
inline emu_dim3 blockDim, gridDim;

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half h) {
  const uint32_t s = (h.bits >> 15) & 1u, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  float v;
  if (e == 0) v = std::ldexp(float(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(float(m | 0x400u), int(e) - 25);
  return s ? -v : v;
}
inline __half __float2half_rn(float f) {
  // exact round-to-nearest-even through double arithmetic on the representable grid
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  float a = std::fabs(f);
  if (std::isnan(f)) return {uint16_t(0x7e00)};
  if (a >= 65520.0f) return {uint16_t(sign | 0x7c00)};
  int e;
  std::frexp(a, &e);            // a = m * 2^e, m in [0.5, 1)
  int exp16 = std::max(e - 1, -14);  // unbiased exponent of the half result (subnormals: -14)
  double q = std::ldexp(double(a), 10 - exp16);  // a in units of the half's last place
  double r = std::nearbyint(q);  // default rounding mode: nearest-even
  uint32_t mant = uint32_t(r);
  if (mant >= 2048) {  // rounded up into the next binade
    mant >>= 1;
    exp16 += 1;
  }
  if (mant < 1024) return {uint16_t(sign | mant)};  // subnormal (exp16 == -14)
  return {uint16_t(sign | uint32_t(exp16 + 15) << 10 | (mant & 0x3ffu))};
}

// WMMA (mma.h) as its documented semantics: each thread holds the whole 16 x 16 tile (the
// warp-collective calls are made by all 32 lanes with the same arguments, so every lane computes
// the same values); loads and stores follow ldm and the layout tag, products accumulate in float.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int m, int n, int k, typename E, typename Layout = void>
struct fragment {
  float v[16 * 16];
};
template <typename F>
inline void fill_fragment(F& f, float value) {
  for (float& e : f.v) e = value;
}
template <typename Use, typename E, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, E, Layout>& f, const P* p, unsigned ldm) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      const P& e = std::is_same_v<Layout, row_major> ? p[i * ldm + j] : p[j * ldm + i];
      if constexpr (std::is_same_v<P, __nv_bfloat16>) f.v[i * 16 + j] = __bfloat162float(e);
      else if constexpr (std::is_same_v<P, __half>) f.v[i * 16 + j] = __half2float(e);
      else f.v[i * 16 + j] = float(e);
    }
}
template <typename E, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, E, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, E, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = s;
    }
  for (int e = 0; e < 256; ++e) d.v[e] = out[e];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i * 16 + j];
}
}  // namespace wmma
}  // namespace nvcuda

// cp.async (cuda_pipeline.h): by default a plain copy at issue (one CTA's threads run to each barrier
// in turn, so a copy that lands at once is a valid schedule, and the one that shows a slot
// overwritten while still being read). Built with MHC_EMU_DEFERRED_COPIES, each thread's copies
// land only when its own __pipeline_wait_prior retires their commit group, the latest that CUDA
// allows: a read of shared memory before the wait (and barrier) that covers it sees the poison.
struct EmuCopy {
  void* dst;
  const void* src;
  size_t bytes;
};
inline void emu_defer_copy(const EmuCopy& c);
inline void emu_commit_copies();
inline void emu_retire_copies(size_t keep);
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes) {
#ifdef MHC_EMU_DEFERRED_COPIES
  emu_defer_copy({dst, src, bytes});
#else
  memcpy(dst, src, bytes);
#endif
}
inline void __pipeline_commit() {
#ifdef MHC_EMU_DEFERRED_COPIES
  emu_commit_copies();
#endif
}
inline void __pipeline_wait_prior(size_t keep) {
#ifdef MHC_EMU_DEFERRED_COPIES
  emu_retire_copies(keep);
#else
  (void)keep;
#endif
}

template <typename P>
inline P __ldg(const P* p) {
  return *p;
}
template <typename P>
inline P __ldcg(const P* p) {
  return *p;
}
// Global atomics and fences: the fibers of a launch run on one OS thread, one at a time.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = v + old;
  return old;
}
inline void __threadfence() {}
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// One CTA: its threads are fibers run round-robin on one OS thread; a thread that waits at a
// barrier yields until the barrier's generation moves on.
struct EmuBarrier {
  int count = 0, expected = 0;
  unsigned gen = 0;
  void drop() {  // a thread exited: it no longer takes part (as an exited GPU thread)
    --expected;
    if (count > 0 && count >= expected) release();
  }
  void release() {
    count = 0;
    ++gen;
  }
};

struct EmuFiber {
  EmuContext ctx;
  std::vector<char> stack;
  bool done = false;
  unsigned cluster_gen = 0;  // the cluster barrier's generation at this thread's last arrive
  std::vector<EmuCopy> open;                   // cp.async copies since the last commit
  std::deque<std::vector<EmuCopy>> groups;     // committed, not yet retired (oldest first)
};

// An mbarrier (mhc_tma.cuh): arrivals and transaction bytes pending in its current phase; a TMA copy
// lands at issue, or (MHC_EMU_DEFERRED_COPIES) when a thread first waits on its barrier, the latest
// the hardware allows: a read of the buffer before that wait sees the poison.
struct EmuMbar {
  int expected = 0, pending = 0;
  long tx = 0;
  unsigned phase = 0;  // phases completed
  std::vector<std::pair<void*, std::vector<unsigned char>>> deferred;
  void check() {
    if (pending == 0 && tx == 0) {
      ++phase;
      pending = expected;
    }
  }
};

// The CTAs that run together: one, or the CTAs of one cluster (fiber t is thread t % threads of
// CTA t / threads); barriers, shuffle and exchange buffers are per CTA / per warp of that CTA.
struct EmuCta {
  std::vector<EmuFiber> fibers;
  EmuContext sched;
  int cur = 0, threads = 0, nwarps = 0;
  std::vector<EmuBarrier> bar, warp;  // per CTA, per (CTA, warp)
  std::vector<EmuBarrier> named;      // per (CTA, barrier id < 16): bar.sync id, count
  EmuBarrier cluster;
  std::vector<float> shfl;
  std::vector<uint64_t> xchg;  // per warp: 32 lanes x 8 words, for the warp-collective mma / ldmatrix
  std::vector<std::vector<float>> dyn;  // dynamic shared memory per CTA (from its first 1024-byte boundary: emu_dyn_base)
  std::map<const void*, struct EmuMbar> mbars;  // mbarriers (mhc_tma.cuh) by their shared-memory address
  std::function<void()> body;
  int cta() const { return cur / threads; }
  int warp_index() const { return cta() * nwarps + (cur % threads) / 32; }  // of the running thread
};
inline EmuCta* emu_cta = nullptr;
// A CTA's dynamic shared memory starts at the first 1024-byte boundary of its buffer, as on the GPU,
// where it starts at one address in every CTA: a kernel that aligns its own buffers up from that start
// (the 128-byte TMA swizzle's 1024 bytes) then finds them at one offset in every CTA of a cluster, which
// distributed shared memory needs (__cluster_map_shared_rank keeps the offset).
inline float* emu_dyn_base(std::vector<float>& v) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 1023) & ~uintptr_t(1023));
}
inline float* emu_dyn_smem = nullptr;  // the running thread's CTA's (read once, at kernel entry)
inline emu_dim3 emu_block;

inline void emu_yield() { emu_switch(emu_cta->fibers[emu_cta->cur].ctx, emu_cta->sched); }

inline void emu_defer_copy(const EmuCopy& c) { emu_cta->fibers[emu_cta->cur].open.push_back(c); }
inline void emu_commit_copies() {
  EmuFiber& f = emu_cta->fibers[emu_cta->cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
inline void emu_retire_copies(size_t keep) {  // all but the `keep` newest groups land
  EmuFiber& f = emu_cta->fibers[emu_cta->cur];
  while (f.groups.size() > keep) {
    for (const EmuCopy& c : f.groups.front()) memcpy(c.dst, c.src, c.bytes);
    f.groups.pop_front();
  }
}

inline void emu_wait(EmuBarrier& b) {
  const unsigned g = b.gen;
  if (++b.count >= b.expected) {
    b.release();
    return;
  }
  while (b.gen == g) emu_yield();
}

inline void __syncthreads() { emu_wait(emu_cta->bar[emu_cta->cta()]); }

// bar.sync id, count: the first `count` threads of the CTA to arrive (a kernel's subset of warps)
inline void emu_named_sync(int id, int count) {
  EmuBarrier& b = emu_cta->named[emu_cta->cta() * 16 + id];
  b.expected = count;
  emu_wait(b);
}
// bar.arrive id, count: counts toward the barrier without waiting for it
inline void emu_named_arrive(int id, int count) {
  EmuBarrier& b = emu_cta->named[emu_cta->cta() * 16 + id];
  b.expected = count;
  if (++b.count >= b.expected) b.release();
}

// A whole-warp barrier: every lane group of a launch makes the same __syncwarp calls (or exits),
// so waiting for the warp is waiting for the group.
inline void __syncwarp(unsigned = 0xffffffffu) { emu_wait(emu_cta->warp[emu_cta->warp_index()]); }

// Thread block clusters (sm_90): barrier.cluster as arrive / wait halves, and a shared-memory
// address of this CTA as the same offset in CTA `rank` of the cluster (dynamic shared memory only).
inline void __cluster_barrier_arrive() {
  EmuBarrier& b = emu_cta->cluster;
  emu_cta->fibers[emu_cta->cur].cluster_gen = b.gen;
  if (++b.count >= b.expected) b.release();
}
inline void __cluster_barrier_wait() {
  while (emu_cta->cluster.gen == emu_cta->fibers[emu_cta->cur].cluster_gen) emu_yield();
}
inline void* __cluster_map_shared_rank(const void* p, unsigned rank) {
  const char* mine = reinterpret_cast<const char*>(emu_dyn_base(emu_cta->dyn[emu_cta->cta()]));
  return reinterpret_cast<char*>(emu_dyn_base(emu_cta->dyn[rank])) + (static_cast<const char*>(p) - mine);
}

inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int tid = int(threadIdx.x), w = emu_cta->warp_index(), lane = tid % 32;
  float* buf = emu_cta->shfl.data() + 32 * w;
  buf[lane] = v;
  emu_wait(emu_cta->warp[w]);
  const float r = buf[lane ^ o];
  emu_wait(emu_cta->warp[w]);
  return r;
}

// Lane src of the lane's group of `width` lanes (CUDA's __shfl_sync with a width).
inline float __shfl_sync(unsigned, float v, int src, int width = 32) {
  const int tid = int(threadIdx.x), w = emu_cta->warp_index(), lane = tid % 32;
  float* buf = emu_cta->shfl.data() + 32 * w;
  buf[lane] = v;
  emu_wait(emu_cta->warp[w]);
  const float r = buf[(lane & ~(width - 1)) | (src & (width - 1))];
  emu_wait(emu_cta->warp[w]);
  return r;
}

// Warp votes over the whole warp (every lane calls them, as the kernels do).
inline int emu_vote(bool v, bool all) {
  const int tid = int(threadIdx.x), w = emu_cta->warp_index();
  float* buf = emu_cta->shfl.data() + 32 * w;
  buf[tid % 32] = v ? 1.0f : 0.0f;
  emu_wait(emu_cta->warp[w]);
  int n = 0;
  for (int l = 0; l < 32; ++l) n += buf[l] != 0.0f;
  emu_wait(emu_cta->warp[w]);
  return all ? n == 32 : n > 0;
}
inline int __all_sync(unsigned, int v) { return emu_vote(v != 0, true); }
inline int __any_sync(unsigned, int v) { return emu_vote(v != 0, false); }

// mhc_dynamic_mma.cuh's warp-collective tensor-core calls (mma.sync m16n8k16 bf16, ldmatrix x4), by
// their PTX fragment layouts: every lane posts its registers (or row address) to the warp's
// exchange buffer, then computes its own outputs from all 32 lanes' posts. Sums in float32 in
// k order (the tensor core's float32 accumulation order is unspecified: tests allow for it).
#define MHC_EMULATED 1
namespace mhc {
namespace mma {
inline void bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int tid = int(threadIdx.x), w = emu_cta->warp_index(), lane = tid % 32;
  uint64_t* buf = emu_cta->xchg.data() + size_t(w) * 32 * 8;
  uint64_t* mine = buf + lane * 8;
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  emu_wait(emu_cta->warp[w]);
  auto half = [](uint64_t reg, int hi) { return __bfloat162float({uint16_t(reg >> (16 * hi))}); };
  auto A = [&](int row, int k) {  // a[0] (row g, k 2q..) a[1] (row g + 8) a[2] (k + 8) a[3] (both)
    const int l = (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8) + 2 * (k >= 8);
    return half(buf[l * 8 + reg], k & 1);
  };
  auto B = [&](int k, int col) {  // b[0] (rows 2q, 2q + 1 of col g) b[1] (rows + 8)
    const int l = col * 4 + (k % 8) / 2;
    return half(buf[l * 8 + 4 + (k >= 8)], k & 1);
  };
  const int g = lane / 4, q = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >= 2), col = 2 * q + (i & 1);
    float sum = d[i];
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    out[i] = sum;
  }
  emu_wait(emu_cta->warp[w]);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
template <bool TRANS>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const int tid = int(threadIdx.x), w = emu_cta->warp_index(), lane = tid % 32;
  uint64_t* buf = emu_cta->xchg.data() + size_t(w) * 32 * 8;
  buf[lane * 8] = reinterpret_cast<uint64_t>(row);
  emu_wait(emu_cta->warp[w]);
  auto at = [&](int l, int e) { return unsigned(reinterpret_cast<const uint16_t*>(buf[l * 8])[e]); };
  const int g = lane / 4, q = lane % 4;
  uint32_t out[4];
  for (int j = 0; j < 4; ++j)  // lane holds (row g, cols 2q, 2q + 1) of matrix j (of its transpose)
    out[j] = TRANS ? at(8 * j + 2 * q, g) | (at(8 * j + 2 * q + 1, g) << 16)
                   : at(8 * j + g, 2 * q) | (at(8 * j + g, 2 * q + 1) << 16);
  emu_wait(emu_cta->warp[w]);
  for (int j = 0; j < 4; ++j) r[j] = out[j];
}
}  // namespace mma
}  // namespace mhc

// TMA (mhc_tma.cuh). The emulated tensor map: mhc_aot.tma's template in tests/cuda_emulation.py's
// layout (32 words: address, rank, swizzle bytes, element bytes, dims, byte strides of dims 1.., box,
// a magic word), not the driver's opaque one.
namespace mhc {
namespace tma {
constexpr uint32_t EMU_MAGIC = 0x54554D45u;  // "EMUT"
struct EmuMap {
  uint64_t addr;
  uint32_t rank, swizzle, elem;
  uint32_t dims[5];
  uint64_t strides[5];  // bytes; strides[0] unused (dim 0 is contiguous)
  uint32_t box[5];
  uint32_t pad[6];
  uint32_t magic;
};
static_assert(sizeof(EmuMap) == 128, "the emulated map fills the 128 bytes of a CUtensorMap");
inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p)); }
inline void emu_fail(const char* what) {
  fprintf(stderr, "emulated TMA: %s\n", what);
  abort();
}
inline void publish_map(uint32_t* gslot, uint32_t* tm, const uint32_t* tmpl, const void* global, int lane) {
  __syncwarp();
  if (lane == 0) {
    memcpy(tm, tmpl, 128);
    EmuMap* m = reinterpret_cast<EmuMap*>(tm);
    if (m->magic != EMU_MAGIC) emu_fail("the template is not an emulated tensor map (tests/cuda_emulation.py)");
    m->addr = reinterpret_cast<uint64_t>(global);
    memcpy(gslot, tm, 128);
  }
  __syncwarp();
}
inline void acquire_map(const uint32_t*) {}
inline EmuMbar& emu_bar(uint64_t* bar) { return emu_cta->mbars[bar]; }
inline void bar_init(uint64_t* bar, int count) {
  EmuMbar& b = emu_bar(bar);
  b = EmuMbar{};
  b.expected = b.pending = count;
}
inline void bar_init_fence() {}
inline void expect_tx(uint64_t* bar, uint32_t bytes) {
  EmuMbar& b = emu_bar(bar);
  b.tx += bytes;
  --b.pending;
  b.check();
}
inline void emu_land(EmuMbar& b) {
  for (auto& [dst, bytes] : b.deferred) {
    memcpy(dst, bytes.data(), bytes.size());
    b.tx -= long(bytes.size());
  }
  b.deferred.clear();
  b.check();
}
inline void load_3d(void* dst, const uint32_t* gslot, uint64_t* bar, int c0, int c1, int c2) {
  const EmuMap& m = *reinterpret_cast<const EmuMap*>(gslot);
  if (m.magic != EMU_MAGIC || m.rank != 3) emu_fail("load_3d through a map that is not a published 3D emulated map");
  if (m.swizzle == 128 && (reinterpret_cast<uintptr_t>(dst) & 1023)) emu_fail("128-byte swizzle into a buffer not 1024-byte aligned");
  if (m.box[0] * m.elem % 16) emu_fail("box rows must be multiples of 16 bytes");
  const size_t row = size_t(m.box[0]) * m.elem, bytes = row * m.box[1] * m.box[2];
  if (m.swizzle == 128 && row != 128) emu_fail("the 128-byte swizzle takes 128-byte box rows here");
  std::vector<unsigned char> out(bytes, 0);
  const int c[3] = {c0, c1, c2};
  for (uint32_t k2 = 0; k2 < m.box[2]; ++k2)
    for (uint32_t k1 = 0; k1 < m.box[1]; ++k1)
      for (uint32_t k0 = 0; k0 < m.box[0]; ++k0) {
        const long g0 = long(c[0]) + k0, g1 = long(c[1]) + k1, g2 = long(c[2]) + k2;
        if (g0 < 0 || g1 < 0 || g2 < 0 || g0 >= m.dims[0] || g1 >= m.dims[1] || g2 >= m.dims[2]) continue;  // zero fill
        size_t off = ((size_t(k2) * m.box[1] + k1) * m.box[0] + k0) * m.elem;
        if (m.swizzle == 128) off ^= ((off >> 7) & 7) << 4;
        const unsigned char* src = reinterpret_cast<const unsigned char*>(m.addr) + size_t(g0) * m.elem +
                                   size_t(g1) * m.strides[1] + size_t(g2) * m.strides[2];
        memcpy(out.data() + off, src, m.elem);
      }
  EmuMbar& b = emu_bar(bar);
  b.deferred.emplace_back(dst, std::move(out));
#ifndef MHC_EMU_DEFERRED_COPIES
  emu_land(b);
#endif
}
inline void wait(uint64_t* bar, uint32_t parity) {
  for (;;) {
    EmuMbar& b = emu_bar(bar);
    if ((b.phase & 1u) != parity) return;  // the phase of this parity has completed
    if (!b.deferred.empty()) {
      emu_land(b);
      continue;
    }
    emu_yield();
  }
}
}  // namespace tma
}  // namespace mhc

inline void emu_trampoline() {
  EmuCta* c = emu_cta;
  c->body();
  c->fibers[c->cur].done = true;
  c->warp[c->warp_index()].drop();
  c->bar[c->cta()].drop();
  c->cluster.drop();
}

// A fiber's first frame: runs the thread, then resumes the scheduler for good.
[[noreturn]] inline void emu_fiber_entry() {
  emu_trampoline();
  emu_fiber_exit(emu_cta->sched);
}

// Runs body() as grid x threads: one CTA, or one cluster of `cluster` CTAs along x, at a time.
template <typename Body>
inline void emu_launch(int gx, int gy, int gz, int threads, size_t smem_bytes, int cluster, Body body) {
  blockDim = {unsigned(threads), 1, 1};
  gridDim = {unsigned(gx), unsigned(gy), unsigned(gz)};
  EmuCta cta;
  const int nwarps = (threads + 31) / 32, total = cluster * threads;
  cta.threads = threads;
  cta.nwarps = nwarps;
  cta.fibers.resize(total);
  for (auto& f : cta.fibers) f.stack.resize(128 * 1024);
  cta.bar.resize(cluster);
  cta.named.resize(size_t(cluster) * 16);
  cta.warp.resize(size_t(cluster) * nwarps);
  cta.shfl.assign(size_t(cluster) * nwarps * 32, 0.0f);
  cta.xchg.assign(size_t(cluster) * nwarps * 32 * 8, 0);
  cta.dyn.resize(cluster);
  cta.body = body;
  emu_cta = &cta;
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x0 = 0; x0 < gx; x0 += cluster) {
        for (int k = 0; k < cluster; ++k) {
          cta.bar[k] = EmuBarrier{0, threads, 0};
          for (int id = 0; id < 16; ++id) cta.named[k * 16 + id] = EmuBarrier{0, 0, 0};
          for (int w = 0; w < nwarps; ++w) cta.warp[k * nwarps + w] = EmuBarrier{0, std::min(32, threads - 32 * w), 0};
          cta.dyn[k].assign(smem_bytes / 4 + 64 + 256, NAN);  // poisoned: a read before a write shows
        }
        cta.cluster = EmuBarrier{0, total, 0};
        for (int t = 0; t < total; ++t) {
          EmuFiber& f = cta.fibers[t];
          f.done = false;
          f.open.clear();  // a previous CTA's copies that no wait retired never land
          f.groups.clear();
          emu_fiber_init(f.ctx, f.stack.data(), f.stack.size(), emu_fiber_entry);
        }
        // MHC_EMU_SHUFFLE=seed: each round resumes the threads in a new pseudo-random order (any order is
        // a schedule a GPU may run), so a thread that passes a wait early can act before others that
        // passed it late; without it, thread order (which can hide a missing barrier between warps)
        std::vector<int> order(total);
        for (int t = 0; t < total; ++t) order[t] = t;
#ifdef MHC_EMU_SHUFFLE
        uint64_t rng = 0x9e3779b97f4a7c15ull * (uint64_t)(MHC_EMU_SHUFFLE + 1) + (uint64_t)x0;
#endif
        for (int live = total; live > 0;) {
          live = 0;
#ifdef MHC_EMU_SHUFFLE
          for (int k = total - 1; k > 0; --k) {  // Fisher-Yates with xorshift64
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            std::swap(order[k], order[(int)(rng % (uint64_t)(k + 1))]);
          }
#endif
          for (int t : order) {
            if (cta.fibers[t].done) continue;
            cta.cur = t;
            threadIdx = {unsigned(t % threads), 0, 0};
            blockIdx = {unsigned(x0 + t / threads), unsigned(y), unsigned(z)};
            emu_dyn_smem = emu_dyn_base(cta.dyn[t / threads]);
            emu_switch(cta.sched, cta.fibers[t].ctx);
            live += !cta.fibers[t].done;
          }
        }
      }
}
