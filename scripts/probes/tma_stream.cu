// TMA through MLX's custom-kernel call, without passing a CUtensorMap as a kernel parameter (MLX's
// precompiled_cuda_kernel passes arrays and scalars only): the host encodes a 2D tensor-map template
// (cuTensorMapEncodeTiled, a placeholder address) and passes its 128 bytes as an input array; each CTA
// copies it to shared memory, writes x's address into it (tensormap.replace, sm_90a), publishes it to
// its own 128-byte slot of a global output (tensormap.cp_fenceproxy) and acquires it for the async
// proxy. Then a persistent loop streams x [rows, cols] bfloat16 in boxes of BR rows x BC columns
// through NST shared-memory stages, one thread issuing each box's copy (cp.async.bulk.tensor) with an
// mbarrier, and sums x: out [G * 128] holds each thread's sum (float32; -DMHC_PROBE_ROWS: row sums
// out[r] = sum_c x[r, c] by atomics, much slower). Probe for issue 6's one-read kernel
// (docs/HISTORY.md, session 20): does it run through MLX, and at what rate does one issuing thread stream?
// Build: nvcc -arch=sm_90a -cubin -DBC=64 -DBR=32 -DNST=4. Grid (threads): (G * 128, 1, 1).
#include <cstdint>
#include <cuda_bf16.h>

#ifndef BC
#define BC 64
#endif
#ifndef BR
#define BR 32
#endif
#ifndef NST
#define NST 4
#endif
#ifdef NS3
constexpr int BOXN = NS3;  // streams in a box (3D)
#else
constexpr int BOXN = 1;
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}\n"
      :: "r"(smem_u32(bar)), "r"(parity) : "memory");
}

extern "C" __global__ void __launch_bounds__(128) tma_stream(const __nv_bfloat16* __restrict__ x,
                                                            const uint8_t* __restrict__ tmpl, float* __restrict__ out,
                                                            uint8_t* __restrict__ maps, int rows, int cols) {
  __shared__ alignas(128) uint8_t tm[128];
  __shared__ alignas(128) __nv_bfloat16 box[NST][BR * BOXN * BC];
  __shared__ alignas(8) uint64_t bar[NST];
  const int tid = threadIdx.x;
  uint8_t* gmap = maps + (size_t)blockIdx.x * 128;
  if (tid < 32) {  // warp 0: the CTA's tensor map with x's address
    reinterpret_cast<uint32_t*>(tm)[tid] = reinterpret_cast<const uint32_t*>(tmpl)[tid];
    __syncwarp();
    if (tid == 0)
      asm volatile("tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%0], %1;"
                   :: "r"(smem_u32(tm)), "l"(reinterpret_cast<uint64_t>(x)) : "memory");
    __syncwarp();
    asm volatile("tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%0], [%1], 128;"
                 :: "l"(gmap), "r"(smem_u32(tm)) : "memory");
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" :: "l"(gmap) : "memory");
  }
  if (tid == 0) {
    for (int s = 0; s < NST; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_u32(&bar[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // rows: tokens (3D) or rows (2D); cols: C (3D) or columns (2D)
  const int rtiles = (rows + BR - 1) / BR, ctiles = (cols + BC - 1) / BC;
  const int nbox = rtiles * ctiles;  // box b: row tile b / ctiles, column tile b % ctiles
  const int G = gridDim.x;
  float acc = 0.0f;
  auto issue = [&](int b, int s) {
    const int r0 = (b / ctiles) * BR, c0 = (b % ctiles) * BC;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_u32(&bar[s])), "r"(BR * BOXN * BC * 2) : "memory");
#ifdef NS3
    // 3D: x [T, NS3, C] as (C, NS3, T), a box of BC columns of all NS3 streams of BR tokens (the
    // one-read kernel's tile: a CTA's columns of every stream); BR * BC * 2 bytes per stream
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
        :: "r"(smem_u32(box[s])), "l"(gmap), "r"(c0), "r"(0), "r"(r0), "r"(smem_u32(&bar[s])) : "memory");
#else
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
        :: "r"(smem_u32(box[s])), "l"(gmap), "r"(c0), "r"(r0), "r"(smem_u32(&bar[s])) : "memory");
#endif
  };
  // this CTA's boxes: b = blockIdx.x + i G
  if (tid == 0)
    for (int i = 0; i < NST - 1; ++i)
      if (blockIdx.x + i * G < nbox) issue(blockIdx.x + i * G, i);
  for (int i = 0;; ++i) {
    const int b = blockIdx.x + i * G;
    if (b >= nbox) break;
    const int s = i % NST;
    if (tid == 0 && b + (NST - 1) * G < nbox) issue(b + (NST - 1) * G, (i + NST - 1) % NST);
    mbar_wait(&bar[s], (i / NST) & 1);
    // every element of the box into this thread's sum (MHC_PROBE_ROWS: row sums by atomics instead)
#ifdef MHC_PROBE_ROWS
    const int r0 = (b / ctiles) * BR, c0 = (b % ctiles) * BC;
    for (int rr = tid / 32; rr < BR; rr += 4) {
      float v = 0.0f;
      for (int c = tid % 32; c < BC; c += 32)
        if (c0 + c < cols) v += __bfloat162float(box[s][rr * BC + c]);
      for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (tid % 32 == 0 && r0 + rr < rows) atomicAdd(out + r0 + rr, v);
    }
#else
    const __nv_bfloat162* p2 = reinterpret_cast<const __nv_bfloat162*>(box[s]);
    for (int e = tid; e < BR * BOXN * BC / 2; e += 128) {
      const float2 f = __bfloat1622float2(p2[e]);
      acc += f.x + f.y;
    }
#endif
    __syncthreads();  // box s is consumed before it is refilled
  }
#ifndef MHC_PROBE_ROWS
  out[(size_t)blockIdx.x * 128 + tid] = acc;
#endif
}
