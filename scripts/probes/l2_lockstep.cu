// Probe (issue 6, docs/HISTORY.md session 36): the data movement of a one-read forward that does not hold
// x in shared memory until h_pre is known. Session 32 found the shipped one-read kernel
// (mhc_dynamic_coeffs_pre) bound by how long a tile stays in shared memory (~13 us from landing to x_in
// done, 192 KB a CTA: ~2 TB/s by Little's law), and its own L2 re-read variant missing L2 because the
// re-read came 15-27 us (60+ MB of traffic) after the first read. This probe walks x in lockstep chunks:
// in phase k every CTA "projects" its unit of chunk k (a TT-token x CW-column tile of all NS streams,
// landed by cp.async R - 1 chunks ahead), publishes per-token partials, arrives on its token tile's
// counter, and then forms x_in of chunk k - 1 once that tile's counter says its S CTAs arrived: the wait
// has a whole product of slack, the DRAM stream never waits on it, and the re-read comes ~R + 1 chunks of
// traffic after the first read, which is meant to be inside L2. The structure of mhc_dynamic_proj_pre
// (session 36), whose timing it predicts without its tensor-core product.
// MODE 0: no x_in (the stream and the counters alone); 1: x_in from an L2 re-read of chunk k - 1;
// 2: x_in from the shared-memory copy of chunk k - 1 (its slot held one phase longer, so one chunk less
// ahead). HINT 1: x's first read asks L2 to keep it (evict_last; MODE 1 only, evict_first otherwise), the
// re-read and x_in's stores evict first.
// The "projection" here is per-token sums on the CUDA cores (z_i = sum_c x[t, i, c], sq = sum x^2), and
// h_i = sigmoid(1e-3 z_i + 1e-6 sq): a stand-in for the tensor-core product and the coefficients, so
// the probe times data movement and the counters, not the product.
// Inputs: x [T, NS, C] bfloat16. Outputs: x_in [T, C] bfloat16, part [4][S][CH][8] float32 (scratch),
// count [T / TT] int32 (a token tile's, zeroed by the launch). Scalars: T, C. Grid (threads): (P * 256, 1, 1),
// P CTAs all// resident (the counters spin); a chunk is P units: CH = P / S * TT tokens, S = C / CW.
// Build: nvcc -O3 -arch=sm_90 -cubin -DTT=32 -DCW=256 -DR=3 -DMODE=1 -DHINT=1.
#include <cstdint>
#include <cuda_bf16.h>

#ifndef TT
#define TT 32
#endif
#ifndef CW
#define CW 256
#endif
#ifndef R
#define R 3
#endif
#ifndef MODE
#define MODE 1
#endif
#ifndef HINT
#define HINT 1
#endif
constexpr int NS = 4, THREADS = 256, WARPS = THREADS / 32, VPR = CW / 8;  // 16-byte vectors a row
constexpr int UNIT_VECS = TT * NS * VPR, UNIT_BYTES = UNIT_VECS * 16;
constexpr int AHEAD = MODE == 2 ? R - 2 : R - 1;  // chunks in flight beyond the one being projected
static_assert(UNIT_VECS % THREADS == 0 && (TT * VPR) % THREADS == 0 && TT % WARPS == 0, "whole rounds");
static_assert(AHEAD >= 1, "at least one chunk in flight");
// x_in items a thread; of them, loaded before the product; partials in flight at once
constexpr int XI = TT * VPR / THREADS, XPRE = XI < 2 ? XI : 2, PU = 8;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp16(uint32_t dst, const void* src, uint64_t pol) {
#if HINT
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "l"(pol)
               : "memory");
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait_groups() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ uint4 ld_reread(const void* p, uint64_t pol) {
  uint4 v;
#if HINT
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(pol));
#else
  (void)pol;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#endif
  return v;
}

__device__ __forceinline__ void widen(uint4 v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    f[2 * e] = __uint_as_float(w[e] << 16);
    f[2 * e + 1] = __uint_as_float(w[e] & 0xffff0000u);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS) l2_lockstep(const __nv_bfloat16* __restrict__ x,
                                                                 __nv_bfloat16* __restrict__ x_in,
                                                                 float* __restrict__ part, int* __restrict__ count,
                                                                 int T, int C) {
  extern __shared__ __align__(16) unsigned char ring[];  // R slots of UNIT_BYTES: [TT][NS][VPR] vectors
  __shared__ float hs[TT][NS];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int P = gridDim.x, S = C / CW, TPC = P / S, CH = TPC * TT, chunks = T / CH;
  const int tile = blockIdx.x / S, split = blockIdx.x % S;
  uint64_t keep = 0, drop = 0;
#if HINT
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(drop));
  if (MODE == 1) {  // only MODE 1 reads x again
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(keep));
  } else {
    keep = drop;
  }
#endif
  (void)drop;
  (void)hs;
  // the unit's rows: token t0 + r, stream j, columns split * CW + [0, CW)
  auto row = [&](int k, int r, int j) { return x + ((size_t)(k * CH + tile * TT + r) * NS + j) * C + split * CW; };
  auto issue = [&](int k) {
    if (k < chunks) {
      const uint32_t slot = smem_u32(ring + (k % R) * UNIT_BYTES);
#pragma unroll 4
      for (int u = tid; u < UNIT_VECS; u += THREADS) {
        const int v = u % VPR, j = (u / VPR) % NS, r = u / (VPR * NS);
        cp16(slot + u * 16, row(k, r, j) + v * 8, keep);
      }
    }
    commit();  // an empty group past the end keeps the wait counts uniform
  };
  auto unit = [&](int k) { return reinterpret_cast<const uint4*>(ring + (k % R) * UNIT_BYTES); };
  auto slotp = [&](int k) { return part + (size_t)(k % 4) * S * CH * 8; };

  for (int k = 0; k < AHEAD; ++k) issue(k);
  for (int k = 0; k <= chunks; ++k) {
    // as mhc_dynamic_proj_pre: x_in's counter and (MODE 1) the x of its first XPRE items are read before
    // the product, so those round trips overlap it
    const bool xin = MODE != 0 && k >= 1;
    const int kx = k - 1;
    int seen = xin && tid == 0 ? *reinterpret_cast<volatile int*>(count + kx * TPC + tile) : 0;
    uint4 wx[XPRE][NS];
#if MODE == 1
    if (xin) {
#pragma unroll
      for (int i = 0; i < XPRE; ++i) {
        const int it = tid + i * THREADS, r = it / VPR, v = it % VPR;
#pragma unroll
        for (int j = 0; j < NS; ++j) wx[i][j] = ld_reread(row(kx, r, j) + v * 8, drop);
      }
    }
#endif
    (void)wx;
    if (k < chunks) {
      issue(k + AHEAD);
      wait_groups<AHEAD>();
      __syncthreads();
      // the stand-in projection: a warp per token, per-stream sums and the sum of squares over the unit's columns
      const uint4* u = unit(k);
      for (int r = warp; r < TT; r += WARPS) {
        float z[NS], sq = 0.0f;
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          z[j] = 0.0f;
          for (int v = lane; v < VPR; v += 32) {
            float f[8];
            widen(u[(r * NS + j) * VPR + v], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              z[j] += f[e];
              sq += f[e] * f[e];
            }
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) {
#pragma unroll
          for (int j = 0; j < NS; ++j) z[j] += __shfl_xor_sync(0xffffffffu, z[j], o);
          sq += __shfl_xor_sync(0xffffffffu, sq, o);
        }
        if (lane == 0) {
          float* p = slotp(k) + ((size_t)split * CH + tile * TT + r) * 8;
          *reinterpret_cast<float4*>(p) = make_float4(z[0], z[1], z[2], z[3]);
          p[4] = sq;
        }
      }
      __syncthreads();  // partials written; (MODE != 2) the slot may be refilled from here on
      if (tid == 0) {  // a token tile's counter: its S CTAs
        __threadfence();
        atomicAdd(count + k * TPC + tile, 1);
      }
    }
#if MODE != 0
    if (xin) {  // x_in of chunk k - 1: its tile's counter had a whole product to fill
      if (tid == 0) {
        while (seen < S) {
          __nanosleep(32);
          seen = *reinterpret_cast<volatile int*>(count + kx * TPC + tile);
        }
        __threadfence();
      }
      __syncthreads();
      if (tid < TT * NS) {  // PU splits' partials in flight at once
        const int r = tid / NS, j = tid % NS;
        const float* p = slotp(kx) + (size_t)(tile * TT + r) * 8;
        float z = 0.0f, sq = 0.0f;
        for (int s0 = 0; s0 < S; s0 += PU) {
          float a[PU], bz[PU];
#pragma unroll
          for (int u = 0; u < PU; ++u) {
            a[u] = s0 + u < S ? __ldcg(p + (size_t)(s0 + u) * CH * 8 + j) : 0.0f;
            bz[u] = s0 + u < S ? __ldcg(p + (size_t)(s0 + u) * CH * 8 + 4) : 0.0f;
          }
#pragma unroll
          for (int u = 0; u < PU; ++u) {
            z += a[u];
            sq += bz[u];
          }
        }
        hs[r][j] = 1.0f / (1.0f + __expf(-(1e-3f * z + 1e-6f * sq)));
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < XI; ++i) {
        const int it = tid + i * THREADS, r = it / VPR, v = it % VPR;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
        for (int j = 0; j < NS; ++j) {
#if MODE == 1
          const uint4 w = i < XPRE ? wx[i < XPRE ? i : 0][j] : ld_reread(row(kx, r, j) + v * 8, drop);
#else
          const uint4 w = unit(kx)[(r * NS + j) * VPR + v];
#endif
          float f[8];
          widen(w, f);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] += hs[r][j] * f[e];
        }
        uint4 o;
        uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const __nv_bfloat162 b = __floats2bfloat162_rn(acc[2 * e], acc[2 * e + 1]);
          ow[e] = *reinterpret_cast<const uint32_t*>(&b);
        }
        uint4* dst = reinterpret_cast<uint4*>(x_in + (size_t)(kx * CH + tile * TT + r) * C + split * CW) + v;
#if HINT
        __stcs(dst, o);
#else
        *dst = o;
#endif
      }
#if MODE == 2
      __syncthreads();  // chunk k - 1's slot is refilled in the next phase
#endif
    }
#endif
  }
}
