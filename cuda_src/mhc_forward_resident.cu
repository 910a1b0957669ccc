// Static mHC forward, strategy `resident` (CUDA only; n <= NMAX in {2, 4}): the Sinkhorn and the
// whole forward in one launch, each token held in registers from its load to its store.
//   M = sinkhorn(exp(L - rowmax L))            (paper eq. 9, as mhc_sinkhorn_fwd; L = H_res_raw)
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
// Why: the fused kernel's pass 2 re-reads the token through L1/L2 and the Sinkhorn is a launch of
// its own (H100, (4096, 4, 4096) bf16: fused kernel 131 us, whole op 146, a copy of x 98). Here x
// is read from DRAM once and never re-read: a thread keeps VPT 16-byte vectors of every stream
// (32 values) across the CTA's RMS reduction. Vector k of thread t covers columns
// (k * blockDim.x + t) * W .. + W, so a warp's loads of a row are 512 contiguous bytes.
// Persistent CTAs: CTA g walks tokens g, g + G, ...; each CTA runs the Sinkhorn once, in warp 0
// while its first token's loads are in flight (a lane per matrix element: sinkhorn_in_lanes). The
// arithmetic per element of x is the fused kernel's, in its order.
// Outputs: out [B, n, C], inv_rms [B] (the backward's), M [n, n] (written by CTA 0; the backward's).
// Launch (mhc_aot/cuda.py: _forward_resident): threadgroup 32 * ceil(C / (32 * W * VPT)) <= MAX_THREADS
// threads, grid min(B, resident CTAs) CTAs; shared RESIDENT_SMEM_FLOATS floats.
#include "mhc_sinkhorn_common.cuh"

using namespace mhc;

static_assert(NMAX == 2 || NMAX == 4, "mhc_forward_resident is built for NMAX in {2, 4}");
constexpr int W = Vec<T>::N;   // elements per 16-byte vector
constexpr int VPT = 8 / NMAX;  // vectors per stream per thread: 32 registers of packed x
// Up to 64 registers per thread for 32 of x plus the math (ptxas: f32 64, no spills; 16-bit types
// widen in pass 2 by widen_fresh and fit 80). A token of C <= MAX_THREADS * W * VPT columns.
constexpr int MAX_THREADS = sizeof(T) == 4 ? 512 : 256;
constexpr int MIN_BLOCKS = sizeof(T) == 4 ? 2 : 3;

// One vector of W elements at column c of a row (zeros past C). VEC: 16-byte load (C % W == 0,
// aligned rows); else element by element.
template <bool VEC>
__device__ __forceinline__ uint4 load_pack(const T* row, int c, int C) {
  uint4 raw = make_uint4(0u, 0u, 0u, 0u);
  if constexpr (VEC) {
    if (c < C) raw = __ldg(reinterpret_cast<const uint4*>(row + c));
  } else {
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < W; ++k) e[k] = c + k < C ? row[c + k] : from_float<T>(0.0f);
  }
  return raw;
}

__device__ __forceinline__ float elem(const uint4& raw, int k) { return to_float(reinterpret_cast<const T*>(&raw)[k]); }

// Warp 0: M into Ms[i * NMAX + j] (zero padded) and, from CTA 0, into Mg[i * n + j]. Lane
// l < NMAX^2 holds P[i = l / NMAX, j = l % NMAX]: row sums are butterflies over lanes l ^ 1 ..
// l ^ NMAX/2, column sums over l ^ NMAX .. l ^ NMAX^2/2, and a lane takes two reciprocals a round.
// Why: a lane per row took NMAX reciprocals a round one after another (rcp.rn.f32's slow-path
// branch ends a basic block) while the CTA's first token waited on M; one value per lane also
// keeps this kernel's 80 registers free of spills. Sums pair up in butterfly order, so M can
// differ from mhc_sinkhorn_fwd's in the last bits.
__device__ __forceinline__ void sinkhorn_in_lanes(const float* L, float* Ms, float* Mg, int n, int iters, float eps) {
  static_assert(NMAX * NMAX <= 32, "one warp holds the matrix");
  const int l = threadIdx.x & 31, i = l / NMAX, j = l % NMAX;
  const bool ok = l < NMAX * NMAX && i < n && j < n;  // other lanes: zero rows of their own groups
  const float v = ok ? L[i * n + j] : -INFINITY;
  float m = v;
#pragma unroll
  for (int o = 1; o < NMAX; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float p = ok ? expf(v - m) : 0.0f;
  for (int t = 0; t < iters; ++t) {
    float s = p;  // row step: a row whose sum is <= eps stays
#pragma unroll
    for (int o = 1; o < NMAX; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    p *= sk_recip(s, eps, 1.0f);
    float c = p;  // column step: a column whose sum is <= eps becomes zero
#pragma unroll
    for (int o = NMAX; o < NMAX * NMAX; o <<= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
    p *= sk_recip(c, eps, 0.0f);
  }
  if (l < NMAX * NMAX) Ms[l] = ok ? p : 0.0f;
  if (blockIdx.x == 0 && ok) Mg[i * n + j] = p;
}

template <bool VEC>
__device__ __forceinline__ void forward_tokens(const T* __restrict__ x, const float* __restrict__ L,
                                               const float* __restrict__ H_pre_raw, const float* __restrict__ H_post_raw,
                                               const float* __restrict__ w, T* __restrict__ out,
                                               float* __restrict__ inv_rms, float* __restrict__ Mg, float* smem,
                                               int n, int C, int B, int iters, float eps) {
  float* scratch = smem;           // 64
  float* Ms = scratch + 64;        // NMAX * NMAX (each row 16- or 8-byte aligned for lds_fresh)
  float* hpre = Ms + NMAX * NMAX;  // NMAX
  float* hpost = hpre + NMAX;      // NMAX
  const int t = threadIdx.x, nt = blockDim.x;
  int parity = 0;
  for (size_t b = blockIdx.x; b < (size_t)B; b += gridDim.x, parity ^= 1) {
    const T* xb = x + b * n * C;
    uint4 xr[NMAX][VPT];
#pragma unroll
    for (int j = 0; j < NMAX; ++j)
#pragma unroll
      for (int k = 0; k < VPT; ++k)
        xr[j][k] = j < n ? load_pack<VEC>(xb + (size_t)j * C, (k * nt + t) * W, C) : make_uint4(0u, 0u, 0u, 0u);
    if (b == blockIdx.x) {  // first token: the parameters, while its loads are in flight
      if (t < 32) sinkhorn_in_lanes(L, Ms, Mg, n, iters, eps);
      if (t < NMAX) {
        hpre[t] = t < n ? sigmoid(H_pre_raw[t]) : 0.0f;
        hpost[t] = t < n ? 2.0f * sigmoid(H_post_raw[t]) : 0.0f;
      }
      __syncthreads();
    }
    float ss = 0.0f, h[NMAX];
    lds_fresh(hpre, h);
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
      for (int e = 0; e < W; ++e) {
        float a = 0.0f;
#pragma unroll
        for (int j = 0; j < NMAX; ++j) a = fmaf(h[j], elem(xr[j][k], e), a);
        ss = fmaf(a, a, ss);
      }
    const float r = rsqrtf(block_sum_once(ss, scratch, parity) / C + eps);
    if (t == 0) inv_rms[b] = r;
    T* ob = out + b * n * C;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (k * nt + t) * W;
      if (c >= C) continue;
      float y[W];
      lds_fresh(hpre, h);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        float a = 0.0f;
#pragma unroll
        for (int j = 0; j < NMAX; ++j) a = fmaf(h[j], widen_fresh<T>(&xr[j][k].x, e), a);
        y[e] = c + e < C ? a * r * __ldg(w + c + e) : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < NMAX; ++i) {
        if (i >= n) break;
        uint4 raw;
        T* o = reinterpret_cast<T*>(&raw);
        float m[NMAX], hp[NMAX];
        lds_fresh(Ms + i * NMAX, m);
        lds_fresh(hpost, hp);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          float acc = hp[i] * y[e];
#pragma unroll
          for (int j = 0; j < NMAX; ++j) acc = fmaf(m[j], widen_fresh<T>(&xr[j][k].x, e), acc);
          o[e] = from_float<T>(acc);
        }
        T* dst = ob + (size_t)i * C + c;
        if constexpr (VEC) {
          *reinterpret_cast<uint4*>(dst) = raw;
        } else {
#pragma unroll
          for (int e = 0; e < W; ++e)
            if (c + e < C) dst[e] = o[e];
        }
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ H_res_raw, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, float* __restrict__ M, int n, int C, int B, int iters, float eps) {
  extern __shared__ float smem[];
  if (vec_ok<T>(C, x, out)) {
    forward_tokens<true>(x, H_res_raw, H_pre_raw, H_post_raw, w, out, inv_rms, M, smem, n, C, B, iters, eps);
  } else {
    forward_tokens<false>(x, H_res_raw, H_pre_raw, H_post_raw, w, out, inv_rms, M, smem, n, C, B, iters, eps);
  }
}
