// Skinny GEMM with a split reduction: part[s, r, m] = sum_{j in split s} A(r, j) B(j, m), and
// optionally sq[s, r] = sum_{j in split s} A(r, j)^2. A(r, j) = A[r * sr + j * sj] (MHC_DTYPE),
// B [J, Mc] float32 row-major. Serves two products of dynamic mHC:
//   forward projection  z = vec(x) @ phi   (r = token, j = k, A = x [T, K]: sr = K, sj = 1; with sq)
//   backward dphi = x^T @ dz               (r = k, j = token, A = x: sr = 1, sj = K)
// Partials over S splits of the reduction keep the GPU busy when R is small and stay
// deterministic (no atomics); their sums are taken by the consumer (coeffs kernel, colsum).
//
// CTA tile: RB rows x MB columns, reduction staged through shared memory JC at a time; each
// thread owns 4 rows x 2 columns (16 x 16 threads). Grid (threads): (ceil(Mc / MB) * THREADS,
// ceil(R / RB), S); blockIdx.x = column tile, so the CTAs sharing an A tile run together.
#include "mhc_dynamic_common.cuh"

using namespace mhc;

namespace {
constexpr int RB = 64, MB = 32, JC = 32, PAD = 4;
}

extern "C" __global__ void __launch_bounds__(THREADS) MHC_NAME(
    const T* __restrict__ A, const float* __restrict__ B, float* __restrict__ part, float* __restrict__ sq,
    int R, int J, int Mc, int sr, int sj, int jsplit, int want_sq) {
  __shared__ __align__(16) float As[JC][RB + PAD];  // As[j][r]
  __shared__ __align__(16) float Bs[JC][MB];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int m0 = blockIdx.x * MB, r0 = blockIdx.y * RB, s = blockIdx.z;
  const int j_begin = s * jsplit, j_end = min(J, j_begin + jsplit);
  const bool rows_contiguous = sj != 1;  // lanes along r (dphi) or along j (projection)
  constexpr int V = Vec<T>::N;
  // the vector path: the strided dimension's stride and the base keep every vector 16-byte aligned
  const bool vec_a = (rows_contiguous ? sr == 1 && sj % V == 0 : sj == 1 && sr % V == 0) &&
                     (reinterpret_cast<uintptr_t>(A) & 15) == 0 && (rows_contiguous || jsplit % V == 0);
  float acc[4][2] = {};
  float sqacc = 0.0f;

  for (int j0 = j_begin; j0 < j_end; j0 += JC) {
    __syncthreads();  // the previous stage is consumed
    if (vec_a) {  // 16-byte loads along the contiguous dimension (r0, j0 are multiples of V)
      for (int e = tid; e < RB * JC / V; e += THREADS) {
        const int rr = rows_contiguous ? (e % (RB / V)) * V : e / (JC / V);
        const int jj = rows_contiguous ? e / (RB / V) : (e % (JC / V)) * V;
        const int r = r0 + rr, j = j0 + jj;
        const T* p = A + (size_t)r * sr + (size_t)j * sj;
        float v[V];
        if (rows_contiguous ? (j < j_end && r + V <= R) : (r < R && j + V <= j_end)) {
          load_vec(p, v);
        } else {
#pragma unroll
          for (int q = 0; q < V; ++q) {
            const bool in = rows_contiguous ? (j < j_end && r + q < R) : (r < R && j + q < j_end);
            v[q] = in ? to_float(p[q]) : 0.0f;  // p walks the contiguous dimension
          }
        }
#pragma unroll
        for (int q = 0; q < V; ++q) {
          if (rows_contiguous) As[jj][rr + q] = v[q];
          else As[jj + q][rr] = v[q];
        }
      }
    } else {
      for (int e = tid; e < RB * JC; e += THREADS) {
        const int rr = rows_contiguous ? e % RB : e / JC;
        const int jj = rows_contiguous ? e / RB : e % JC;
        const int r = r0 + rr, j = j0 + jj;
        As[jj][rr] = (r < R && j < j_end) ? to_float(A[(size_t)r * sr + (size_t)j * sj]) : 0.0f;
      }
    }
    for (int e = tid; e < JC * MB; e += THREADS) {
      const int jj = e / MB, mm = e % MB, j = j0 + jj, m = m0 + mm;
      Bs[jj][mm] = (j < j_end && m < Mc) ? B[(size_t)j * Mc + m] : 0.0f;
    }
    __syncthreads();
    if (want_sq && tid < RB) {
#pragma unroll 8
      for (int jj = 0; jj < JC; ++jj) sqacc += As[jj][tid] * As[jj][tid];
    }
#pragma unroll 8
    for (int jj = 0; jj < JC; ++jj) {
      const float4 a = *reinterpret_cast<const float4*>(&As[jj][ty * 4]);
      const float2 b = *reinterpret_cast<const float2*>(&Bs[jj][tx * 2]);
      acc[0][0] += a.x * b.x; acc[0][1] += a.x * b.y;
      acc[1][0] += a.y * b.x; acc[1][1] += a.y * b.y;
      acc[2][0] += a.z * b.x; acc[2][1] += a.z * b.y;
      acc[3][0] += a.w * b.x; acc[3][1] += a.w * b.y;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = r0 + ty * 4 + i;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int m = m0 + tx * 2 + q;
      if (r < R && m < Mc) part[((size_t)s * R + r) * Mc + m] = acc[i][q];
    }
  }
  if (want_sq && blockIdx.x == 0 && tid < RB && r0 + tid < R) sq[(size_t)s * R + r0 + tid] = sqacc;
}
