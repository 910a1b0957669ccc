// Static mHC forward, strategy `fused`: one threadgroup per token, x read from memory once.
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)
// Pass 1 streams x and reduces sum(agg^2); pass 2 re-reads the token, which this threadgroup has
// just pulled into cache, recomputes agg in registers and writes out. inv_rms is saved for the
// backward. Mirrors cuda_src/mhc_forward_fused.cu (which keeps agg in shared memory instead).
// Threadgroup memory (static): Mt[NMAX * PADCAP] (NMAX > 0) + hpre[PADCAP] + hpost[PADCAP] + NSIMD.
// Launch: grid (B * THREADS, 1, 1), threadgroup (THREADS, 1, 1).
#include "mhc_token_passes.h"

using namespace mhc;

static_assert((NMAX > 0 ? NMAX * PADCAP : 0) + 2 * PADCAP + NSIMD <= TG_FLOATS_MAX, "threadgroup memory over 32 KB");

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
  float eps;
};

template <int W, typename MA>
inline void forward_token(device const T* xb, device T* ob, device float* inv_rms, device const float* w, MA ma,
                          threadgroup const float* hpre, threadgroup const float* hpost, threadgroup float* scratch,
                          int n, int C, float eps, Tid t) {
  const float ss = block_sum(aggregate_pass<T, W>(xb, hpre, n, C, 0, C, t), scratch, t);
  const float r = precise::rsqrt(ss / C + eps);
  if (t.tid == 0) *inv_rms = r;
  ForwardExtra<W> extra{hpre, hpost, w, r, {}};
  mix_pass<T, W>(xb, ob, ma, n, C, 0, C, extra, t);
}

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const float* M [[buffer(1)]],
                      device const float* H_pre_raw [[buffer(2)]], device const float* H_post_raw [[buffer(3)]],
                      device const float* w [[buffer(4)]], constant Scalars& s [[buffer(5)]],
                      device T* out [[buffer(6)]], device float* inv_rms [[buffer(7)]],
                      uint tid [[thread_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]], uint3 tgid [[threadgroup_position_in_grid]]) {
  const Tid t{tid, lane, sg};
  const int n = s.n, C = s.C;
  threadgroup float hpre[PADCAP];
  threadgroup float hpost[PADCAP];
  threadgroup float scratch[NSIMD];
#if MHC_NMAX > 0
  threadgroup float Mt[NMAX * PADCAP];
  stage_matrix<true>(M, n, Mt, t);
  const StagedM<true> ma{Mt, padded_streams(n)};
#else
  const DeviceM ma{M, n};
#endif
  stage_activation(H_pre_raw, 1.0f, n, hpre, t);
  stage_activation(H_post_raw, 2.0f, n, hpost, t);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint b = tgid.x;
  device const T* xb = x + size_t(b) * n * C;
  device T* ob = out + size_t(b) * n * C;
  if (vec_ok(C)) {
    forward_token<VEC>(xb, ob, inv_rms + b, w, ma, hpre, hpost, scratch, n, C, s.eps, t);
  } else {
    forward_token<1>(xb, ob, inv_rms + b, w, ma, hpre, hpost, scratch, n, C, s.eps, t);
  }
}
