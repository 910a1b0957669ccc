// Static mHC backward, strategy `resident` (CUDA only; n <= NMAX in {2, 4}, C <= THREADS * 16):
// x and dout read from DRAM once per token into shared memory (cp.async), dx written once, every
// parameter gradient accumulated in registers across the CTA's tokens. Same math as
// mhc_backward_fused (see its header), with y = agg * r * w, g = dy * w:
//   dy[c] = sum_i H_post[i] dout[i, c];  dagg[c] = r g[c] - r^3 agg[c] (sum_c' g[c'] agg[c']) / C
//   dx[j, c] = sum_i M[i, j] dout[i, c] + H_pre[j] dagg[c]
//   dM[i, j] += dout[i, c] x[j, c];  dH_post[i] += dout[i, c] y[c];  dH_pre[j] += dagg[c] x[j, c]
//   dw[c] += dy[c] agg[c] r
// Why: the fused backward re-reads each token through L1/L2 in its second pass and reduces
// dH_post with a warp shuffle per stream per column vector (H100, (4096, 4, 4096) bf16: forward +
// backward 971 us against a byte roof of 229). Here a thread owns UPT 8-byte units of columns
// (unit u of thread t: columns (u * THREADS + t) * U .. + U) in every token, so its dw stays in
// 16 registers, and dM / dH_pre / dH_post in n^2 + 2n more; they are summed over the CTA once, at
// the end, in a fixed order (deterministic, no atomics).
// Persistent CTAs: CTA g walks tokens g, g + G, ...; two share an SM (68 KB of shared memory each
// at n = 4, C = 4096 bf16; up to 128 registers: ptxas spills 0.7-1.5 KB at the 80 of three), so one
// CTA's copies overlap the other's math.
// partial[g] = [dM (n*n) | dH_pre (n) | dH_post (n) | dw (C)] as mhc_backward_fused's, reduced by
// mhc_backward_reduce (activations' derivatives applied there).
// Launch (mhc_aot/cuda.py: _backward_resident): grid (G * THREADS, 1, 1), threadgroup (THREADS, 1, 1),
// shared RESIDENT_PARAM_FLOATS + 2 * n * C elements of T (in floats: rounded up).
#include <cuda_pipeline.h>

#include "mhc_common.cuh"

using namespace mhc;

static_assert(NMAX == 2 || NMAX == 4, "mhc_backward_resident is built for NMAX in {2, 4}");
constexpr int U = 8 / sizeof(T);  // elements per 8-byte unit: 2 (f32) or 4 (f16, bf16)
constexpr int UPT = 16 / U;       // units per thread: 16 columns, so C <= THREADS * 16
constexpr int RED = NMAX * NMAX + 2 * NMAX;  // dM, dH_pre, dH_post of a thread
constexpr int NWARPS = THREADS / 32;
// scratch (64) | M^T (NMAX^2) | hpre | hpost | per-warp sums (NWARPS * RED): a multiple of 4 floats,
// so the token buffers after it are 16-byte aligned
constexpr int PARAM_FLOATS = 64 + NMAX * NMAX + 2 * NMAX + NWARPS * RED;
static_assert(PARAM_FLOATS % 4 == 0, "token buffers must start 16-byte aligned");

// One unit of U elements at column c of a shared-memory row, packed (zeros past C). UNIT: one
// 8-byte load (C % U == 0 keeps every row 8-byte aligned); else element by element.
template <bool UNIT>
__device__ __forceinline__ uint2 load_unit(const T* row, int c, int C) {
  uint2 raw = make_uint2(0u, 0u);
  if constexpr (UNIT) {
    raw = *reinterpret_cast<const uint2*>(row + c);
  } else {
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < U; ++k) e[k] = c + k < C ? row[c + k] : from_float<T>(0.0f);
  }
  return raw;
}

template <bool UNIT>
__device__ __forceinline__ void store_unit(T* p, int c, int C, const float (&v)[U]) {
  if constexpr (UNIT) {
    uint2 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < U; ++k) e[k] = from_float<T>(v[k]);
    *reinterpret_cast<uint2*>(p + c) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < U; ++k)
      if (c + k < C) p[c + k] = from_float<T>(v[k]);
  }
}

// Copy `count` elements from global to shared memory: cp.async in 16-byte pieces when both ends
// allow it, else element by element. Returns after this thread's copies have landed.
__device__ __forceinline__ void copy_token(T* dst, const T* src, size_t count, bool pieces) {
  if (pieces) {
    constexpr int P = 16 / sizeof(T);
    for (size_t e = threadIdx.x * (size_t)P; e < count; e += (size_t)THREADS * P) __pipeline_memcpy_async(dst + e, src + e, 16);
  } else {
    for (size_t e = threadIdx.x; e < count; e += THREADS) dst[e] = src[e];
  }
}

// Unit c of every stream of the token's x and dout (packed; zeros for streams >= n) and H_pre,
// H_post: what both passes start a unit with.
template <bool UNIT>
__device__ __forceinline__ void load_units(const T* xs, const T* ds, const float* hpre, const float* hpost, int c,
                                           int n, int C, uint2 (&xu)[NMAX], uint2 (&du)[NMAX], float (&hp)[NMAX],
                                           float (&hq)[NMAX]) {
#pragma unroll
  for (int j = 0; j < NMAX; ++j) {
    xu[j] = j < n ? load_unit<UNIT>(xs + (size_t)j * C, c, C) : make_uint2(0u, 0u);
    du[j] = j < n ? load_unit<UNIT>(ds + (size_t)j * C, c, C) : make_uint2(0u, 0u);
  }
  lds_fresh(hpre, hp);
  lds_fresh(hpost, hq);
}

// Element e of a unit: agg = sum_j H_pre[j] x[j] and dy = sum_i H_post[i] dout[i] (fused's order).
__device__ __forceinline__ void agg_dy(const uint2 (&xu)[NMAX], const uint2 (&du)[NMAX], const float (&hp)[NMAX],
                                       const float (&hq)[NMAX], int e, float& a, float& dy) {
  a = 0.0f;
  dy = 0.0f;
#pragma unroll
  for (int j = 0; j < NMAX; ++j) {
    a = fmaf(hp[j], widen<T>(&xu[j].x, e), a);
    dy = fmaf(hq[j], widen<T>(&du[j].x, e), dy);
  }
}

template <bool UNIT>
__device__ __forceinline__ void backward_tokens(const T* __restrict__ x, const T* __restrict__ dout,
                                                const float* __restrict__ w, const float* __restrict__ inv_rms,
                                                T* __restrict__ dx, float* smem, float* out, int n, int C, int B,
                                                bool pieces) {
  float* scratch = smem;
  const float* MrT = scratch + 64;  // MrT[j * NMAX + i] = M[i, j], zero padded
  const float* hpre = MrT + NMAX * NMAX;
  const float* hpost = hpre + NMAX;
  T* xs = reinterpret_cast<T*>(smem + PARAM_FLOATS);
  T* ds = xs + (size_t)n * C;
  const int t = threadIdx.x;
  float dm[NMAX][NMAX] = {}, dhpre[NMAX] = {}, dhpost[NMAX] = {}, dw[UPT][U] = {};
  int parity = 0;
  for (size_t b = blockIdx.x; b < (size_t)B; b += gridDim.x, parity ^= 1) {
    if (b != blockIdx.x) __syncthreads();  // every thread is done with the previous token's buffers
    copy_token(xs, x + b * n * C, (size_t)n * C, pieces);
    copy_token(ds, dout + b * n * C, (size_t)n * C, pieces);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    const float r = inv_rms[b];
    // pass 1: agg, dy and the RMS dot; dw, dH_post and dM accumulate
    float dot = 0.0f;
#pragma unroll
    for (int u = 0; u < UPT; ++u) {
      const int c = (u * THREADS + t) * U;
      if (c >= C) break;
      uint2 xu[NMAX], du[NMAX];  // packed
      float hp[NMAX], hq[NMAX];
      load_units<UNIT>(xs, ds, hpre, hpost, c, n, C, xu, du, hp, hq);
#pragma unroll
      for (int e = 0; e < U; ++e) {
        const float wc = c + e < C ? __ldg(w + c + e) : 0.0f;
        float a, dy;
        agg_dy(xu, du, hp, hq, e, a, dy);
        const float y = a * r * wc, g = dy * wc;
        dot = fmaf(g, a, dot);
        dw[u][e] = fmaf(dy * a, r, dw[u][e]);
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
          dhpost[i] = fmaf(widen<T>(&du[i].x, e), y, dhpost[i]);
#pragma unroll
          for (int j = 0; j < NMAX; ++j) dm[i][j] = fmaf(widen<T>(&du[i].x, e), widen<T>(&xu[j].x, e), dm[i][j]);
        }
      }
    }
    const float k = r * r * r * block_sum_once(dot, scratch, parity) / C;
    // pass 2: dx, dH_pre
    T* dxb = dx + b * n * C;
#pragma unroll
    for (int u = 0; u < UPT; ++u) {
      const int c = (u * THREADS + t) * U;
      if (c >= C) break;
      float dagg[U];
      uint2 xu[NMAX], du[NMAX];  // packed
      float hp[NMAX], hq[NMAX];
      load_units<UNIT>(xs, ds, hpre, hpost, c, n, C, xu, du, hp, hq);
#pragma unroll
      for (int e = 0; e < U; ++e) {
        const float wc = c + e < C ? __ldg(w + c + e) : 0.0f;
        float a, dy;
        agg_dy(xu, du, hp, hq, e, a, dy);
        dagg[e] = r * (dy * wc) - k * a;
      }
#pragma unroll
      for (int j = 0; j < NMAX; ++j) {
        if (j >= n) break;
        float o[U], m[NMAX];  // column j of M: rows of Mr transposed (MrT)
        lds_fresh(MrT + j * NMAX, m);
#pragma unroll
        for (int e = 0; e < U; ++e) {
          float acc = hp[j] * dagg[e];
#pragma unroll
          for (int i = 0; i < NMAX; ++i) acc = fmaf(m[i], widen<T>(&du[i].x, e), acc);
          o[e] = acc;
          dhpre[j] = fmaf(dagg[e], widen<T>(&xu[j].x, e), dhpre[j]);
        }
        store_unit<UNIT>(dxb + (size_t)j * C, c, C, o);
      }
    }
  }
  // the CTA's partial sums: dw straight from its owner; the rest over lanes, then warps in order
  const int P = n * n + 2 * n + C;
  out += (size_t)blockIdx.x * P;
#pragma unroll
  for (int u = 0; u < UPT; ++u)
#pragma unroll
    for (int e = 0; e < U; ++e) {
      const int c = (u * THREADS + t) * U + e;
      if (c < C) out[n * n + 2 * n + c] = dw[u][e];
    }
  float* warp_red = scratch + 64 + NMAX * NMAX + 2 * NMAX;
  const int lane = t & 31, warp = t >> 5;
  auto publish = [&](int slot, float v) {
    v = warp_sum(v);
    if (lane == 0) warp_red[warp * RED + slot] = v;
  };
#pragma unroll
  for (int i = 0; i < NMAX; ++i) {
#pragma unroll
    for (int j = 0; j < NMAX; ++j) publish(i * NMAX + j, dm[i][j]);
    publish(NMAX * NMAX + i, dhpre[i]);
    publish(NMAX * NMAX + NMAX + i, dhpost[i]);
  }
  __syncthreads();
  if (t < RED) {
    float v = 0.0f;
    for (int q = 0; q < NWARPS; ++q) v += warp_red[q * RED + t];
    const int i = t < NMAX * NMAX ? t / NMAX : (t - NMAX * NMAX) % NMAX;
    const int j = t % NMAX;
    if (t < NMAX * NMAX) {
      if (i < n && j < n) out[i * n + j] = v;
    } else if (i < n) {
      out[n * n + (t < NMAX * NMAX + NMAX ? 0 : n) + i] = v;
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, 2) MHC_NAME(
    const T* __restrict__ x, const T* __restrict__ dout, const float* __restrict__ M,
    const float* __restrict__ H_pre_raw, const float* __restrict__ H_post_raw, const float* __restrict__ w,
    const float* __restrict__ inv_rms, T* __restrict__ dx, float* __restrict__ partial, int n, int C, int B) {
  extern __shared__ float smem[];
  float* MrT = smem + 64;
  float* hpre = MrT + NMAX * NMAX;
  float* hpost = hpre + NMAX;
  const int t = threadIdx.x;
  if (t < NMAX * NMAX) MrT[t] = t / NMAX < n && t % NMAX < n ? M[(t % NMAX) * n + t / NMAX] : 0.0f;
  if (t < NMAX) {
    hpre[t] = t < n ? sigmoid(H_pre_raw[t]) : 0.0f;
    hpost[t] = t < n ? 2.0f * sigmoid(H_post_raw[t]) : 0.0f;
  }
  // (the first token's barrier publishes these)
  const uintptr_t mask = 15;
  const bool pieces = ((size_t)n * C * sizeof(T)) % 16 == 0 &&
                      ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(dout)) & mask) == 0;
  if (C % U == 0 && (reinterpret_cast<uintptr_t>(dx) & 7) == 0) {
    backward_tokens<true>(x, dout, w, inv_rms, dx, smem, partial, n, C, B, pieces);
  } else {
    backward_tokens<false>(x, dout, w, inv_rms, dx, smem, partial, n, C, B, pieces);
  }
}
