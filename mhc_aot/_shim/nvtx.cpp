// NVTX ranges for `mhc profile`: each stage (Sinkhorn, forward, backward) is pushed as a named
// range on the calling thread, where MLX's CUDA backend launches the kernels, so Nsight Compute
// (`ncu --nvtx`) and Nsight Systems show which stage a kernel belongs to. NVTX v3 is header-only
// (the CUDA toolkit's nvtx3/): with no profiler attached a push is a no-op, and no library is
// linked. Built without the header (no CUDA toolkit at build time, macOS), the calls return -1
// and nvtx_available() says why.
#include "shim.h"

#if defined(MHC_AOT_HAVE_NVTX)
#include <nvtx3/nvToolsExt.h>
#endif

namespace mhc_shim {

py::dict nvtx_available() {
#if defined(MHC_AOT_HAVE_NVTX)
  py::dict d;
  d["available"] = true;
  d["how"] = "NVTX v3, header-only from the CUDA toolkit at build time; ranges appear under Nsight tools";
  return d;
#else
  return unavailable("built without NVTX: the CUDA toolkit's nvtx3/nvToolsExt.h was not found at build time");
#endif
}

int nvtx_range_push(const std::string& name) {
#if defined(MHC_AOT_HAVE_NVTX)
  return nvtxRangePushA(name.c_str());
#else
  (void)name;
  return -1;
#endif
}

int nvtx_range_pop() {
#if defined(MHC_AOT_HAVE_NVTX)
  return nvtxRangePop();
#else
  return -1;
#endif
}

}  // namespace mhc_shim
