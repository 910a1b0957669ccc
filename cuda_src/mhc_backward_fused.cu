// Static mHC backward, strategy `fused`: dx for each token plus per-CTA partial sums of the
// parameter gradients, reduced over CTAs afterwards by mhc_backward_reduce (no atomics in
// global memory, deterministic). With y = agg * r * w, g = dy * w and dout = dL/dout:
//   dy[c]      = sum_i H_post[i] dout[i, c]
//   dagg[c]    = r g[c] - r^3 agg[c] (sum_c' g[c'] agg[c']) / C          (RMSNorm backward)
//   dx[j, c]   = sum_i M[i, j] dout[i, c] + H_pre[j] dagg[c]
//   dH_post[i] = sum dout[i, c] y[c];  dH_pre[j] = sum dagg[c] x[j, c];  dw[c] = sum dy[c] agg[c] r
//   dM[i, j]   = sum dout[i, c] x[j, c]   (here only when NMAX <= 4: n^2 registers per thread;
//                                          larger n use mhc_backward_dm)
// CTA g walks tokens g, g + G, ... Pass A reads x and dout (agg, dy, dH_post, dw, the RMS dot);
// pass B re-reads them from L1/L2 and writes dx.
// partial[g] = [dM (n*n) | dH_pre (n) | dH_post (n) | dw (C)], activations' derivatives not applied.
// Launch: grid (G * THREADS, 1, 1), threadgroup (THREADS, 1, 1);
// shared: M[n * pad] + hpre[pad] + hpost[pad] + 32 + red[n * n + 2 * pad + (THREADS / 32) * pad]
//         + THREAD_SLOTS + 3 * C floats (mhc_aot/cuda.py: _backward_smem_floats).
#include "mhc_token_passes.cuh"

using namespace mhc;

constexpr bool DM_IN_REGISTERS = NMAX > 0 && NMAX <= 4;  // n^2 <= 16 accumulators; more would spill

struct Smem {
  float *Mr, *hpre, *hpost, *scratch, *dM, *dhpre, *dhpost, *warp_dhpost, *thread_dhpre, *warp_dm, *agg, *g, *dw;
};

// Per-thread dH_pre slots and per-warp dM slots (fixed-order reductions, no atomics).
constexpr int THREAD_SLOTS = THREADS * IB + (THREADS / 32) * (DM_IN_REGISTERS ? NMAX * IB : 0);

template <int W>
__device__ __forceinline__ void backward_tokens(const T* x, const T* dout, T* dx, const float* w, const float* inv_rms,
                                                const Smem& s, int n, int C, int B) {
  constexpr int NM = W == 1 ? 0 : NMAX;
  constexpr int NMB = DM_IN_REGISTERS ? NMAX : NM;  // dm[i] needs i known at compile time
  const int pad = padded_streams(n), nib = pad / IB, nvec = C / W;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float dm[DM_IN_REGISTERS ? NMAX : 1][DM_IN_REGISTERS ? IB : 1] = {};
  // Pass B gives each thread one fixed row block j0 (threads past per_block * nib idle there), so
  // dH_pre accumulates in registers and is reduced in a fixed order at the end: deterministic.
  const int per_block = blockDim.x / nib, active = per_block * nib;
  const int j0 = (threadIdx.x % nib) * IB;
  float dhpre[IB] = {};
  for (int b = blockIdx.x; b < B; b += gridDim.x) {
    const size_t off = (size_t)b * n * C;
    const T* xb = x + off;
    const T* db = dout + off;
    const float r = inv_rms[b];
    // pass A: one column vector at a time, every stream. The loop is warp-uniform (warp_sum
    // inside): lanes past the last column take part with zeros.
    float dot = 0.0f;
    for (int c = threadIdx.x * W; c - lane * W < C; c += blockDim.x * W) {
      const bool valid = c < C;
      float a[W] = {}, dy[W] = {}, y[W] = {};
      if (valid) {
        for_streams<NM>(n, [&](int j) {
          float xv[W];
          load_w<T, W>(xb + (size_t)j * C + c, xv);
#pragma unroll
          for (int e = 0; e < W; ++e) a[e] = fmaf(s.hpre[j], xv[e], a[e]);
        });
#pragma unroll
        for (int e = 0; e < W; ++e) y[e] = a[e] * r * w[c + e];
      }
      for_streams<NM>(n, [&](int i) {
        float d[W] = {};
        if (valid) load_w<T, W>(db + (size_t)i * C + c, d);
        float p = 0.0f;
#pragma unroll
        for (int e = 0; e < W; ++e) {
          dy[e] = fmaf(s.hpost[i], d[e], dy[e]);
          p = fmaf(d[e], y[e], p);
        }
        p = warp_sum(p);
        if (lane == 0) s.warp_dhpost[warp * pad + i] += p;
      });
      if (valid) {
#pragma unroll
        for (int e = 0; e < W; ++e) {
          const float g = dy[e] * w[c + e];
          dot = fmaf(g, a[e], dot);
          s.dw[c + e] = fmaf(dy[e] * a[e], r, s.dw[c + e]);  // this thread owns column c + e in every token
          s.agg[c + e] = a[e];
          s.g[c + e] = g;
        }
      }
    }
    dot = block_sum(dot, s.scratch);  // also publishes agg and g
    const float k = r * r * r * dot / C;
    // pass B: IB streams j of one column vector per work item
    for (int v = threadIdx.x / nib; threadIdx.x < active && v < nvec; v += per_block) {
      const int c = v * W;
      float dagg[W], acc[IB][W], xj[IB][W];
#pragma unroll
      for (int e = 0; e < W; ++e) dagg[e] = r * s.g[c + e] - k * s.agg[c + e];
#pragma unroll
      for (int q = 0; q < IB; ++q) {
        if (j0 + q < n) {
          load_w<T, W>(xb + (size_t)(j0 + q) * C + c, xj[q]);
        } else {
#pragma unroll
          for (int e = 0; e < W; ++e) xj[q][e] = 0.0f;
        }
        float p = 0.0f;
#pragma unroll
        for (int e = 0; e < W; ++e) {
          acc[q][e] = s.hpre[j0 + q] * dagg[e];
          p = fmaf(dagg[e], xj[q][e], p);
        }
        dhpre[q] += p;
      }
      for_streams<NMB>(n, [&](int i) {
        float d[W];
        load_w<T, W>(db + (size_t)i * C + c, d);
        const float* m = s.Mr + i * pad + j0;
#pragma unroll
        for (int q = 0; q < IB; ++q) {
          float p = 0.0f;
#pragma unroll
          for (int e = 0; e < W; ++e) {
            acc[q][e] = fmaf(m[q], d[e], acc[q][e]);
            p = fmaf(d[e], xj[q][e], p);
          }
          if constexpr (DM_IN_REGISTERS) dm[i][q] += p;  // i is a compile-time index: NMAX <= 4 unrolls fully
        }
      });
#pragma unroll
      for (int q = 0; q < IB; ++q) {
        if (j0 + q < n) store_w<T, W>(dx + off + (size_t)(j0 + q) * C + c, acc[q]);
      }
    }
    __syncthreads();  // agg and g are rewritten by the next token
  }
#pragma unroll
  for (int q = 0; q < IB; ++q) s.thread_dhpre[threadIdx.x * IB + q] = threadIdx.x < active ? dhpre[q] : 0.0f;
  if constexpr (DM_IN_REGISTERS) {
    // nib == 1 here, so dm[i][q] is entry (i, q); butterfly within the warp, then per-warp slots
#pragma unroll
    for (int i = 0; i < NMAX; ++i) {
#pragma unroll
      for (int q = 0; q < IB; ++q) {
        const float v = warp_sum(dm[i][q]);
        if (lane == 0) s.warp_dm[warp * NMAX * IB + i * IB + q] = v;
      }
    }
  }
  __syncthreads();
  // fixed-order sums over threads (dH_pre) and warps (dM)
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float v = 0.0f;
    for (int t = (j / IB) % nib; t < active; t += nib) v += s.thread_dhpre[t * IB + j % IB];
    s.dhpre[j] = v;
  }
  if constexpr (DM_IN_REGISTERS) {
    for (int k = threadIdx.x; k < n * n; k += blockDim.x) {
      float v = 0.0f;
      for (int q = 0; q < THREADS / 32; ++q) v += s.warp_dm[q * NMAX * IB + (k / n) * IB + k % n];
      s.dM[k] = v;
    }
  }
}

// Three CTAs per SM (two left the H100 at 25% active warps and 37% of DRAM bandwidth at
// (4096, 4, 4096)): pass A of one token overlaps pass B of another.
extern "C" __global__ void __launch_bounds__(THREADS, 3) MHC_NAME(
    const T* __restrict__ x, const T* __restrict__ dout, const float* __restrict__ M,
    const float* __restrict__ H_pre_raw, const float* __restrict__ H_post_raw, const float* __restrict__ w,
    const float* __restrict__ inv_rms, T* __restrict__ dx, float* __restrict__ partial, int n, int C, int B) {
  extern __shared__ float smem[];
  const int pad = padded_streams(n), nwarps = THREADS / 32;
  Smem s;
  s.Mr = smem;
  s.hpre = s.Mr + n * pad;
  s.hpost = s.hpre + pad;
  s.scratch = s.hpost + pad;
  s.dM = s.scratch + 32;
  s.dhpre = s.dM + n * n;
  s.dhpost = s.dhpre + pad;
  s.warp_dhpost = s.dhpost + pad;
  s.thread_dhpre = s.warp_dhpost + nwarps * pad;
  s.warp_dm = s.thread_dhpre + THREADS * IB;
  s.agg = s.thread_dhpre + THREAD_SLOTS;
  s.g = s.agg + C;
  s.dw = s.g + C;
  stage_params(M, H_pre_raw, H_post_raw, n, s.Mr, s.hpre, s.hpost, /*transpose=*/false);
  for (int k = threadIdx.x; k < n * n + 2 * pad + nwarps * pad; k += blockDim.x) s.dM[k] = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) s.dw[c] = 0.0f;
  __syncthreads();
  if (vec_ok<T>(C, x, dout, dx)) {
    backward_tokens<Vec<T>::N>(x, dout, dx, w, inv_rms, s, n, C, B);
  } else {
    backward_tokens<1>(x, dout, dx, w, inv_rms, s, n, C, B);
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v = 0.0f;
    for (int q = 0; q < nwarps; ++q) v += s.warp_dhpost[q * pad + i];
    s.dhpost[i] = v;
  }
  __syncthreads();
  const int P = n * n + 2 * n + C;
  float* out = partial + (size_t)blockIdx.x * P;
  for (int k = threadIdx.x; k < P; k += blockDim.x) {
    float v;
    if (k < n * n) v = s.dM[k];
    else if (k < n * n + n) v = s.dhpre[k - n * n];
    else if (k < n * n + 2 * n) v = s.dhpost[k - n * n - n];
    else v = s.dw[k - n * n - 2 * n];
    out[k] = v;
  }
}
