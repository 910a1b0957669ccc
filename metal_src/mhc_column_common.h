// Tiling shared by the two `column` forward kernels. Mirrors cuda_src/mhc_column_common.cuh.
#pragma once

#include "mhc_token_passes.h"

namespace mhc {
namespace {

constant constexpr int TILE_C = 1024;  // columns per threadgroup: a B=1 token of C=8192 spreads over 8

// Sum of agg^2 over columns [c0, c1) of one token (this thread's share).
template <int W>
inline float tile_sumsq(device const T* xb, threadgroup const float* hpre, int n, int C, int c0, int c1, Tid t) {
  return aggregate_pass<T, W>(xb, hpre, n, C, c0, c1, t);
}

}  // namespace
}  // namespace mhc
