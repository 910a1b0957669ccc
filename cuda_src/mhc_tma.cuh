// TMA (the Hopper tensor memory accelerator) for kernels launched through MLX's
// mx.fast.precompiled_cuda_kernel, which passes arrays and scalars but no CUtensorMap parameter. The
// host encodes a tensor-map template at a placeholder address (mhc_aot/tma.py, libcuda's
// cuTensorMapEncodeTiled) and passes its 128 bytes as an input array; each CTA copies it to shared
// memory, writes the array's real address into it (tensormap.replace), publishes it to its own
// 128-byte slot of a global scratch output and acquires it for the async proxy (publish_map,
// acquire_map). Box copies then go through that slot (load_3d), completing on an mbarrier
// (expect_tx, wait). sm_90a only: tensormap.replace is an arch-specific instruction, so kernels
// including this header are built as sm_90a cubins (build_tools/variants.py, arch_exact).
// Probe and numbers: scripts/probes/tma_probe.py (docs/HISTORY.md, session 20). The CPU emulation
// (mhc_dynamic_emulate.h, tests only) defines MHC_EMULATED and implements the same calls.
#pragma once

#include <stdint.h>

namespace mhc {
namespace tma {

#ifndef MHC_EMULATED
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Warp-collective (every lane of one warp): the template tmpl with `global`'s address, published to
// gslot (128 bytes, 128-byte aligned) through tm (128 bytes of shared memory, 128-byte aligned).
__device__ __forceinline__ void publish_map(uint32_t* gslot, uint32_t* tm, const uint32_t* tmpl, const void* global,
                                            int lane) {
  tm[lane] = tmpl[lane];
  __syncwarp();
  if (lane == 0)
    asm volatile("tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%0], %1;"
                 ::"r"(smem_addr(tm)), "l"(reinterpret_cast<uint64_t>(global)) : "memory");
  __syncwarp();
  asm volatile("tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%0], [%1], 128;"
               ::"l"(gslot), "r"(smem_addr(tm)) : "memory");
}
// By each thread that issues copies through gslot, after a barrier with the publishing warp.
__device__ __forceinline__ void acquire_map(const uint32_t* gslot) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(gslot) : "memory");
}

// One thread initialises the CTA's mbarriers (arrival count 1: the thread that issues a copy), then
// bar_init_fence, then a barrier before any use.
__device__ __forceinline__ void bar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// The issuing thread's arrival on bar, announcing `bytes` of copies that will complete on it.
__device__ __forceinline__ void expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// The box at coordinates (c0, c1, c2) of the map in gslot into dst (its layout and swizzle are the
// map's; dst 1024-byte aligned under the 128-byte swizzle); out-of-range elements read as zero and
// count toward the box's bytes.
__device__ __forceinline__ void load_3d(void* dst, const uint32_t* gslot, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
      ::"r"(smem_addr(dst)), "l"(gslot), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar)) : "memory");
}

// Until the phase of bar with this parity has completed (its copies have landed and are visible).
__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}\n"
      ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
#endif

// Byte offset of the 16-byte chunk `chunk` (0 .. 7) of 128-byte line `line` of a buffer written by a
// copy with the 128-byte swizzle (CU_TENSOR_MAP_SWIZZLE_128B, the buffer 1024-byte aligned): the
// chunk index XOR the line index mod 8, so eight consecutive lines' same chunk sit in eight bank groups.
__device__ __forceinline__ uint32_t swizzle128(int line, int chunk) {
  return static_cast<uint32_t>(line) * 128u + static_cast<uint32_t>((chunk ^ (line & 7)) << 4);
}

}  // namespace tma
}  // namespace mhc
