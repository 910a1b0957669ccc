// dM[i, j] = sum over tokens b and columns c of dout[b, i, c] x[b, j, c], for the n (> 4) whose
// n^2 accumulators do not fit the fused backward's registers. Threadgroup g walks chunks
// (token, 32 columns) g, g + G, ...: stages dout and x of the chunk in threadgroup memory as
// float32 (rows padded to 33 floats: no bank conflicts), then each thread adds 32 products to
// the dM entries it owns (entry k = tid + m * THREADS, kept in registers here: Metal's 32 KB
// holds the tiles but not n*n more floats). Writes one partial [n * n] per threadgroup;
// mhc_backward_reduce sums them in a fixed order. Mirrors cuda_src/mhc_backward_dm.cu.
// Serves n <= DM_N_LIMIT (the launcher sends larger n to MLX's own VJP).
// Launch: grid (G * THREADS, 1, 1), threadgroup (THREADS, 1, 1).
#include "mhc_common.h"

using namespace mhc;

constant constexpr int CHUNK = 32;
constant constexpr int DM_N_LIMIT = 64;
constant constexpr int DM_PER_THREAD = DM_N_LIMIT * DM_N_LIMIT / THREADS;  // dM entries a thread owns
static_assert(2 * DM_N_LIMIT * (CHUNK + 1) <= TG_FLOATS_MAX, "threadgroup memory over 32 KB");

// The CUDA kernel's scalar arguments, in order (the `scalars` input buffer).
struct Scalars {
  int n;
  int C;
  int B;
};

kernel void MHC_ENTRY(device const T* x [[buffer(0)]], device const T* dout [[buffer(1)]],
                      constant Scalars& s [[buffer(2)]], device float* partial [[buffer(3)]],
                      uint tid [[thread_index_in_threadgroup]], uint3 tgid [[threadgroup_position_in_grid]],
                      uint3 ntg [[threadgroups_per_grid]]) {
  const int n = s.n, C = s.C, B = s.B;
  threadgroup float D[DM_N_LIMIT * (CHUNK + 1)];  // D[i * 33 + k] = dout[b, i, c0 + k]
  threadgroup float X[DM_N_LIMIT * (CHUNK + 1)];  // X[j * 33 + k] = x[b, j, c0 + k]
  float acc[DM_PER_THREAD] = {};                  // acc[m]: entry tid + m * THREADS
  const int per_token = (C + CHUNK - 1) / CHUNK;
  const long chunks = long(B) * per_token;
  for (long ch = long(tgid.x); ch < chunks; ch += long(ntg.x)) {
    const long b = ch / per_token;
    const int c0 = int(ch % per_token) * CHUNK;
    const size_t off = size_t(b) * n * C;
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk's tiles are no longer read
    for (int k = int(tid); k < n * CHUNK; k += THREADS) {
      const int row = k / CHUNK, col = k % CHUNK, c = c0 + col;
      const bool in = c < C;
      D[row * (CHUNK + 1) + col] = in ? to_float(dout[off + row * C + c]) : 0.0f;
      X[row * (CHUNK + 1) + col] = in ? to_float(x[off + row * C + c]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int m = 0; m < DM_PER_THREAD; ++m) {
      const int k = int(tid) + m * THREADS;
      if (k >= n * n) break;
      threadgroup const float* d = D + (k / n) * (CHUNK + 1);
      threadgroup const float* xr = X + (k % n) * (CHUNK + 1);
      float sum = 0.0f;
      for (int q = 0; q < CHUNK; ++q) sum = fma(d[q], xr[q], sum);
      acc[m] += sum;
    }
  }
  for (int m = 0; m < DM_PER_THREAD; ++m) {
    const int k = int(tid) + m * THREADS;
    if (k < n * n) partial[size_t(tgid.x) * n * n + k] = acc[m];
  }
}
