// Stand-in for {fmt}, which mlx/backend/cuda/lru_cache.h includes for one error message in a template this
// probe never instantiates; the MLX wheel ships MLX's headers but not {fmt}'s.
#pragma once
#include <string>
namespace fmt {
template <typename... Args>
std::string format(Args&&...) {
  return "(message formatted by {fmt} in MLX)";
}
}  // namespace fmt
