// dM[i, j] = sum over tokens b and columns c of dout[b, i, c] x[b, j, c], for the n (> 4) whose
// n^2 accumulators do not fit the fused backward's registers. CTA g walks chunks (token,
// 32 columns) g, g + G, ...: stages dout and x of the chunk in shared memory as float32 (rows
// padded to 33 floats: no bank conflicts), then each thread adds 32 products to the dM entries
// it owns (entry k = threadIdx.x + m * THREADS, kept in shared memory). Writes one partial
// [n * n] per CTA; mhc_backward_reduce sums them in a fixed order.
// Launch: grid (G * THREADS, 1, 1), threadgroup (THREADS, 1, 1); shared: (2 * n * 33 + n * n) floats.
#include "mhc_common.cuh"

using namespace mhc;

constexpr int CHUNK = 32;

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(const T* __restrict__ x, const T* __restrict__ dout,
                                                                 float* __restrict__ partial, int n, int C, int B) {
  extern __shared__ float smem[];
  float* D = smem;                  // D[i * 33 + k] = dout[b, i, c0 + k]
  float* X = D + n * (CHUNK + 1);   // X[j * 33 + k] = x[b, j, c0 + k]
  float* acc = X + n * (CHUNK + 1);  // acc[i * n + j]
  for (int k = threadIdx.x; k < n * n; k += blockDim.x) acc[k] = 0.0f;
  const int per_token = (C + CHUNK - 1) / CHUNK;
  const long chunks = (long)B * per_token;
  for (long ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
    const long b = ch / per_token;
    const int c0 = (int)(ch % per_token) * CHUNK;
    const size_t off = (size_t)b * n * C;
    __syncthreads();  // the previous chunk's tiles are no longer read
    for (int k = threadIdx.x; k < n * CHUNK; k += blockDim.x) {
      const int row = k / CHUNK, col = k % CHUNK, c = c0 + col;
      const bool in = c < C;
      D[row * (CHUNK + 1) + col] = in ? to_float(dout[off + (size_t)row * C + c]) : 0.0f;
      X[row * (CHUNK + 1) + col] = in ? to_float(x[off + (size_t)row * C + c]) : 0.0f;
    }
    __syncthreads();
    for (int k = threadIdx.x; k < n * n; k += blockDim.x) {
      const float* d = D + (k / n) * (CHUNK + 1);
      const float* xr = X + (k % n) * (CHUNK + 1);
      float s = 0.0f;
#pragma unroll
      for (int q = 0; q < CHUNK; ++q) s = fmaf(d[q], xr[q], s);
      acc[k] += s;
    }
  }
  __syncthreads();
  for (int k = threadIdx.x; k < n * n; k += blockDim.x) partial[(size_t)blockIdx.x * n * n + k] = acc[k];
}
