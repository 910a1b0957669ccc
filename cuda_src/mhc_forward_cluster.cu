// Static mHC forward, strategy `cluster` (CUDA, sm_90+, bfloat16, n == NMAX in {16, 32}): a thread
// block cluster of CLUSTER CTAs per token. CTA rank k holds columns [k S, (k + 1) S) of all n
// streams (S = C / CLUSTER) in shared memory from one cp.async read of x, so x is read from DRAM
// once and never re-read: the fused kernel's mixing pass re-reads its n x C token through L2,
// which held it to 36% of the copy roof at (1024, 32, 2048) (245 us, Nsight Compute, H100).
//   out[b, i, c] = sum_j M[i, j] x[b, j, c] + H_post[i] * agg[b, c] * inv_rms[b] * w[c]
//   agg[b, c] = sum_j H_pre[j] x[b, j, c],  inv_rms[b] = rsqrt(mean_c agg^2 + eps)   (eq. 3)
// Pass 1: agg over the slice and its sum of squares; each CTA's sum crosses the cluster through
// distributed shared memory and every CTA adds the CLUSTER partials in rank order (the same bits
// everywhere). Pass 2: the mix on tensor cores as in mhc_forward_fused (M split hi + lo in A
// fragments, x as B fragments by ldmatrix.trans); each warp owns 16-column groups, writes its
// results over the x it has consumed and stores them as whole 32-byte sectors.
// Shared memory (floats): x slice n S / 2 (row j's 16-byte segment s at s ^ (j & 7): the eight rows
// an ldmatrix phase reads sit in eight bank groups), agg S, hpre / hpost NMAX each, 32 + 1.
// Launch: grid (B * CLUSTER * CL_THREADS, 1, 1), threadgroup (CL_THREADS, 1, 1); C % (64 CLUSTER)
// == 0. Built from compute_90 PTX only (variants.py: min_arch), as clusters need.
#include <cuda_pipeline.h>
#include <type_traits>

#include "mhc_dynamic_mma.cuh"  // mma.sync / ldmatrix wrappers, split_a_fragments (CUDA-only)

using namespace mhc;

constexpr int CLUSTER = 4, CL_THREADS = 128, SEG = 8;  // SEG: bfloat16 per 16-byte segment

extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(CL_THREADS, 4) MHC_NAME(
    const T* __restrict__ x, const float* __restrict__ M, const float* __restrict__ H_pre_raw,
    const float* __restrict__ H_post_raw, const float* __restrict__ w, T* __restrict__ out,
    float* __restrict__ inv_rms, int n, int C, float eps) {
  static_assert(std::is_same_v<T, bf16> && (NMAX == 16 || NMAX == 32), "variants.py: bf16, n16 / n32 only");
  constexpr int N = NMAX, T16 = N / 16, NWARPS = CL_THREADS / 32;
  extern __shared__ float smem[];
  const int S = C / CLUSTER, segs = S / SEG;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, q = lane & 3;
  const unsigned rank = blockIdx.x % CLUSTER;  // a 1-D grid of (CLUSTER, 1, 1) clusters
  const size_t b = blockIdx.x / CLUSTER;
  bf16* xs = reinterpret_cast<bf16*>(smem);
  float* agg = smem + N * S / 2;
  float* hpre = agg + S;
  float* hpost = hpre + N;
  float* scratch = hpost + N;
  float* part = scratch + 32;
  const bf16* xb = x + b * N * C + rank * S;
  bf16* ob = out + b * N * C + rank * S;
  const float* wb = w + rank * S;

  // the slice, every 16-byte segment in flight at once
  for (int e = threadIdx.x; e < N * segs; e += CL_THREADS) {
    const int j = e / segs, s = e % segs;
    __pipeline_memcpy_async(mma::swizzled_segment(xs, S, j, s), xb + (size_t)j * C + s * SEG, 16);
  }
  __pipeline_commit();
  // while it lands: the activations and M's A fragments
  if (threadIdx.x < N) {
    hpre[threadIdx.x] = sigmoid(H_pre_raw[threadIdx.x]);
    hpost[threadIdx.x] = 2.0f * sigmoid(H_post_raw[threadIdx.x]);
  }
  uint32_t a[2][T16][T16][4];
  mma::split_a_fragments<N>(M, a, lane);
  __pipeline_wait_prior(0);
  __syncthreads();

  // pass 1: agg and this CTA's share of sum(agg^2), a thread per 16-byte column segment
  float ss = 0.0f;
  for (int s = threadIdx.x; s < segs; s += CL_THREADS) {
    float acc[SEG] = {};
#pragma unroll 8
    for (int j = 0; j < N; ++j) {
      const uint4 raw = *reinterpret_cast<const uint4*>(mma::swizzled_segment(xs, S, j, s));
      const unsigned* words = reinterpret_cast<const unsigned*>(&raw);
      const float h = hpre[j];
#pragma unroll
      for (int e = 0; e < SEG; ++e) acc[e] = fmaf(h, widen<bf16>(words, e), acc[e]);
    }
#pragma unroll
    for (int e = 0; e < SEG; ++e) {
      agg[s * SEG + e] = acc[e];
      ss = fmaf(acc[e], acc[e], ss);
    }
  }
  ss = block_sum(ss, scratch);  // ends synchronised: agg is complete
  if (threadIdx.x == 0) *part = ss;
  __cluster_barrier_arrive();  // release: this CTA's partial ...
  __cluster_barrier_wait();    // ... and every peer's are visible
  float total = 0.0f;
#pragma unroll
  for (int k = 0; k < CLUSTER; ++k) total += *static_cast<const float*>(__cluster_map_shared_rank(part, k));
  __cluster_barrier_arrive();  // done reading peers: the wait before exit keeps each CTA's partial alive
  const float r = rsqrtf(total / C + eps);
  if (rank == 0 && threadIdx.x == 0) inv_rms[b] = r;

  // pass 2: out = M x + hpost (agg r w) on tensor cores, a warp per 16-column group
  for (int grp = warp; grp < S / 16; grp += NWARPS) {
    const int c0 = 16 * grp + 2 * q;  // this lane's first column of the group
    mma::mix_store_group<N>(
        a, xs, S, 2 * grp, hpost,
        [&](int nt) {
          const int c = c0 + 8 * nt;
          return make_float2(agg[c] * r * __ldg(wb + c), agg[c + 1] * r * __ldg(wb + c + 1));
        },
        ob + 16 * grp, C, lane);
  }
  __cluster_barrier_wait();  // no CTA exits while a peer may still read its partial
}
