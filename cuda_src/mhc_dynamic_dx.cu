// dx of the coefficients (and pre) path, token-tiled (mhc_mm_norm_bwd, src/liger_kernel/ops/
// mhc.py:291-295, plus LigerMHCPreFunction's grad_x):
//   dx[t, k] = sum_m dz[t, m] phi[k, m] + factor[t] x[t, k] + (has_pre ? h_pre[t, k / C] dx_in[t, k % C] : 0)
//              + (has_acc ? acc[t, k] : 0)
// acc: x's gradient from elsewhere (the layer's mhc_post_res), added here instead of by a separate
// pass over three [T, K] arrays.
// with dz, factor from mhc_dynamic_coeffs_bwd. A [T, M] x [M, K] product with a short reduction
// (M = n n + 2 n), so the kernel is bound by streaming x, dx_in and dx: CTA tile TT = 64 tokens x
// KB = 128 k's, M staged through shared memory MC at a time (any M), each thread 4 tokens x 8 k's.
// A thread's 8 k's are G = 8 / V vectors of V = Vec<T>::N consecutive k's (one for f16 / bf16,
// two 64 k's apart for f32), and the 16 threads of a token row touch consecutive 16-byte vectors:
// with C % V == 0 and aligned rows (vec_ok) every x / dx_in / dx access is one coalesced 16-byte
// vector whose stream j = k / C and column k % C are computed once; otherwise (odd C, offset
// views) the same tile takes an exact scalar path. Per element the same float32 order on both:
// the m sum in order, + x factor, + h_pre dx_in. x (and dx_in) are prefetched into L2 at the
// start, so their DRAM latency overlaps the staging and the product.
// Inputs: x [T, K], dz [T, M], phi [K, M] (float32), factor [T], h_pre [T, n], dx_in [T, C] (or any
// array if !has_pre), acc [T, K] (or any array if !has_acc).
// Output: dx [T, K] (MHC_DTYPE). Grid (threads): (ceil(K / KB) * THREADS, ceil(T / TT), 1);
// blockIdx.x = k tile, so the CTAs of one token tile run together and share dz and dx_in in L2.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

// bfloat16 or not, at compile time (outside the unnamed namespace, whose unused members nvcc reports)
template <typename E>
constexpr bool is_bf16 = false;
template <>
constexpr bool is_bf16<mhc::bf16> = true;

namespace {
constexpr int TX = 16, TY = THREADS / TX;  // threads along k, along tokens
constexpr int TR = 4, KV = 8;              // tokens, k's per thread
constexpr int TT = TY * TR, KB = TX * KV;  // 64 tokens x 128 k's
constexpr int MC = 32, MU = 8, PAD = 4;    // m's per shared stage; stages padded to MU (unrolled)
constexpr int V = Vec<T>::N, G = KV / V;   // elements per 16-byte vector, vectors per thread row
// Staging: a warp moves SR / WARPS = 4 tile rows x MU m's per instruction, the CTA SR rows
constexpr int SR = dyn::WARPS * 4, PSTEP = 4 * SR / V;  // PSTEP = ps_col(kk + SR) - ps_col(kk)
static_assert(TR == 4 && KV == 8 && (V == 4 || V == 8) && MC % MU == 0 && MU == 8 && TT % SR == 0 &&
              KB % SR == 0, "one float4 of Zs, two of Ps per m; staging lanes 4 rows x MU m's");
static_assert((TT + PAD) % 32 == 4 && (KB + PAD) % 32 == 4, "MU shared rows 4 banks apart: staging conflict-free");

// Tile column of element q (0..KV-1) of thread column tx: vector q / V of the thread sits
// TX * V columns after the previous one, so each vector pass of the TX threads is contiguous.
__device__ __forceinline__ int tile_k(int tx, int q) { return (q / V) * (TX * V) + tx * V + q % V; }

// Ps column of tile column kk: a thread's KV values lie at tx * 4 and TX * 4 + tx * 4, so both
// float4 reads of a token row's 16 threads are 256 contiguous bytes (no bank conflict).
__device__ __forceinline__ int ps_col(int kk) {
  const int tx = (kk % (TX * V)) / V, q = (kk / (TX * V)) * V + kk % V;
  return (q / 4) * (TX * 4) + tx * 4 + q % 4;
}

// A 16-byte load kept packed until used (half the registers of floats for f16 / bf16), widened.
// bfloat16 is the top half of a float32: the same values by shift and mask, spelled out because
// nvcc's cvt.f32.bf16 (its PTX for sm_90 and later) costs this kernel 17 registers under ptxas:
// 97 instead of 80, one CTA fewer per SM.
__device__ __forceinline__ void widen(const uint4& raw, float (&v)[V]) {
  if constexpr (is_bf16<T>) {
    const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const unsigned lo = w[q] << 16, hi = w[q] & 0xffff0000u;  // element 2q: the low half
      memcpy(&v[2 * q], &lo, 4);
      memcpy(&v[2 * q + 1], &hi, 4);
    }
  } else {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int q = 0; q < V; ++q) v[q] = to_float(e[q]);
  }
}

// Hint: fetch the line holding p into L2 without holding registers. Nothing off the GPU (the
// CPU emulation of the tests), where it has no meaning.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef __CUDA_ARCH__
  asm volatile("prefetch.L2 [%0];" ::"l"(p));  // generic address: no cvta needed
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ dz, const float* __restrict__ phi,
    const float* __restrict__ factor, const float* __restrict__ h_pre, const T* __restrict__ dx_in,
    const T* __restrict__ acc_in, T* __restrict__ dx, int Tn, int K, int M, int C, int n, int has_pre, int has_acc) {
  __shared__ __align__(16) float Zs[MC][TT + PAD];  // Zs[m][t]
  __shared__ __align__(16) float Ps[MC][KB + PAD];  // Ps[m][ps_col(k)]
  const int tid = threadIdx.x, ty = tid / TX, tx = tid % TX;
  const int k0 = blockIdx.x * KB, t0 = blockIdx.y * TT, tb = t0 + ty * TR;
  // C % V == 0 also makes K % V == 0: a vector is wholly inside [0, K) and inside one stream
  const bool vec = vec_ok<T>(C, x, dx, has_pre ? dx_in : nullptr) &&
                   vec_ok<T>(C, x, has_acc ? acc_in : nullptr);

  // Stream and column of each vector's first k: one division per vector, not per element.
  int js[G], cs[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int k = k0 + tile_k(tx, g * V);
    js[g] = k / C;
    cs[g] = k - js[g] * C;
  }
  // x (and the first reads of dx_in) come from DRAM: start their fetch into L2 now, so it overlaps
  // the staging and the product (holding them in registers instead would cost a CTA per SM).
#pragma unroll
  for (int i = 0; i < TR; ++i)
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int tk = tb + i, k = k0 + tile_k(tx, g * V);
      if (tk < Tn && k < K) {
        prefetch_l2(x + (size_t)tk * K + k);
        if (has_acc) prefetch_l2(acc_in + (size_t)tk * K + k);
        if (has_pre) prefetch_l2(dx_in + (size_t)tk * C + cs[g]);
      }
    }

  // Staging: a warp moves 4 tile rows (lanes % 4: consecutive Zs / Ps columns) x MU m's (lanes / 4:
  // Zs / Ps rows, 4 banks apart as LD % 32 == 4) per instruction, so its shared stores hit 32
  // distinct banks and its loads are 4 runs of 32 bytes; the warps cover 32 rows, then the next 32.
  constexpr int ZI = TT / SR, PI = KB / SR;  // rows per thread
  const int lane = tid % 32, row = tid / 32 * 4 + lane % 4, mq = lane / 4;

  float acc[TR][KV] = {};
  for (int m0 = 0; m0 < M; m0 += MC) {
    const int mc = min(MC, M - m0);
    __syncthreads();  // the previous stage is consumed
    for (int mb = 0; mb < mc; mb += MU) {  // rows mc .. a multiple of MU are zero: the product's unroll
      const int mm = mb + mq;
      const bool m_in = mm < mc;
      float zv[ZI], pv[PI];  // every load of this MU-block in flight before the stores
#pragma unroll
      for (int i = 0; i < ZI; ++i) {
        const int tk = t0 + row + i * SR;
        zv[i] = m_in && tk < Tn ? dz[(size_t)tk * M + m0 + mm] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < PI; ++i) {
        const int k = k0 + row + i * SR;
        pv[i] = m_in && k < K ? phi[(size_t)k * M + m0 + mm] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < ZI; ++i) Zs[mm][row + i * SR] = zv[i];
#pragma unroll
      for (int i = 0; i < PI; ++i) Ps[mm][ps_col(row) + i * PSTEP] = pv[i];
    }
    __syncthreads();
    for (int mb = 0; mb < mc; mb += MU) {
#pragma unroll
      for (int u = 0; u < MU; ++u) {
        const int mm = mb + u;
        const float4 a = *reinterpret_cast<const float4*>(&Zs[mm][ty * TR]);
        const float4 p = *reinterpret_cast<const float4*>(&Ps[mm][tx * 4]);
        const float4 r = *reinterpret_cast<const float4*>(&Ps[mm][TX * 4 + tx * 4]);
        const float av[TR] = {a.x, a.y, a.z, a.w}, pv[KV] = {p.x, p.y, p.z, p.w, r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < TR; ++i)
#pragma unroll
          for (int q = 0; q < KV; ++q) acc[i][q] += av[i] * pv[q];
      }
    }
  }

  if (vec) {  // every x / dx_in vector of the thread in flight at once, then the math and stores
    uint4 xr[TR][G], gr[TR][G];
#pragma unroll
    for (int i = 0; i < TR; ++i)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const int tk = tb + i, k = k0 + tile_k(tx, g * V);
        if (tk < Tn && k < K) {
          xr[i][g] = __ldg(reinterpret_cast<const uint4*>(x + (size_t)tk * K + k));
          if (has_pre) gr[i][g] = __ldg(reinterpret_cast<const uint4*>(dx_in + (size_t)tk * C + cs[g]));
        }
      }
#pragma unroll
    for (int i = 0; i < TR; ++i) {
      const int tk = tb + i;
      if (tk >= Tn) continue;
      // factor and h_pre per token: after the first token their lines sit in L1 (loading them with
      // the vectors above costs ~20 registers, a CTA per SM)
      const float fac = factor[tk];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const int k = k0 + tile_k(tx, g * V);
        if (k >= K) continue;
        float xv[V], v[V];
        widen(xr[i][g], xv);
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = acc[i][g * V + q] + xv[q] * fac;
        if (has_pre) {
          const float h = h_pre[(size_t)tk * n + js[g]];
          float gv[V];
          widen(gr[i][g], gv);
#pragma unroll
          for (int q = 0; q < V; ++q) v[q] += h * gv[q];
        }
        if (has_acc) {  // loaded here, not with x above: its line is already on its way to L2
          float av[V];
          widen(__ldg(reinterpret_cast<const uint4*>(acc_in + (size_t)tk * K + k)), av);
#pragma unroll
          for (int q = 0; q < V; ++q) v[q] += av[q];
        }
        store_vec(dx + (size_t)tk * K + k, v);
      }
    }
  } else {  // scalar: any C, any alignment; (j, c) of consecutive k's by carry, not division
#pragma unroll
    for (int i = 0; i < TR; ++i) {
      const int tk = tb + i;
      if (tk >= Tn) continue;
      const float fac = factor[tk];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        int j = js[g], c = cs[g];
#pragma unroll
        for (int q = 0; q < V; ++q) {
          const int k = k0 + tile_k(tx, g * V + q);
          if (k >= K) break;
          float v = acc[i][g * V + q] + to_float(x[(size_t)tk * K + k]) * fac;
          if (has_pre) v += h_pre[(size_t)tk * n + j] * to_float(dx_in[(size_t)tk * C + c]);
          if (has_acc) v += to_float(acc_in[(size_t)tk * K + k]);
          dx[(size_t)tk * K + k] = from_float<T>(v);
          if (++c == C) {
            c = 0;
            ++j;
          }
        }
      }
    }
  }
}
