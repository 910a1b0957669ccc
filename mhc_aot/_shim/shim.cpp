// mhc_aot._shim: the small native side of mhc-aot (DESIGN.md section 3).
//   build_info()            compiler and flags of this build, which optional parts it has
//   cuda_device_facts()     GPU facts from the CUDA driver, opened at run time (no link dependency)
//   cuda_check_cubin()      loads a shipped cubin/PTX through the driver and reports its resources
//   metal_kernel_key()      the name and library-cache key MLX gives an mx.fast.metal_kernel call
//   metal_preload()         (macOS with MLX's headers) puts mhc_aot.metallib into that cache
//   nvtx_range_push/pop()   named NVTX ranges for Nsight tools (nvtx.cpp)
// Nothing here raises because a driver, a GPU or a toolchain is absent: such calls return
// {"available": False, "reason": ...}.
#include "shim.h"

#include <string>

namespace mhc_shim {

py::dict unavailable(const std::string& reason) {
  py::dict d;
  d["available"] = false;
  d["reason"] = reason;
  return d;
}

namespace {

#ifndef MHC_AOT_SHIM_FLAGS
#define MHC_AOT_SHIM_FLAGS ""
#endif

py::dict build_info() {
  py::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["cplusplus"] = static_cast<long>(__cplusplus);
  d["flags"] = std::string(MHC_AOT_SHIM_FLAGS);
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                  "." + std::to_string(PYBIND11_VERSION_PATCH);
#if defined(__APPLE__)
  d["platform"] = "macos";
#elif defined(__linux__)
  d["platform"] = "linux";
#else
  d["platform"] = "other";
#endif
#if defined(__linux__)
  d["cuda_driver"] = "dlopen(\"libcuda.so.1\") at call time; no link-time dependency";
#else
  d["cuda_driver"] = "not built: the CUDA driver query is Linux-only";
#endif
  d["metal"] = metal_build_facts();
  d["nvtx"] = nvtx_available();
  return d;
}

}  // namespace
}  // namespace mhc_shim

PYBIND11_MODULE(_shim, m) {
  namespace py = pybind11;
  using namespace mhc_shim;
  m.doc() = "mhc-aot native shim: build facts, CUDA driver checks, Metal library preload";
  m.def("build_info", &build_info, "Compiler, flags and optional parts of this build of the shim.");
  m.def("cuda_device_facts", &cuda_device_facts, py::arg("device") = 0,
        "Facts about CUDA device `device` from the driver (dlopen'd at call time), or "
        "{'available': False, 'reason': ...}.");
  m.def("cuda_check_cubin", &cuda_check_cubin, py::arg("image"), py::arg("kernel_name"), py::arg("device") = 0,
        "Load a cubin/PTX/fatbin with cuModuleLoadData in the device's primary context, look up `kernel_name` "
        "and report its registers, shared memory and thread limit; {'ok': False, 'error': ...} if that fails.");
  m.def("metal_kernel_key", &metal_kernel_key, py::arg("name"), py::arg("inputs"), py::arg("outputs"),
        py::arg("source"), py::arg("header") = "", py::arg("compile_options") = 0,
        "The kernel name, generated source and Metal library-cache key that mx.fast.metal_kernel (MLX "
        "pinned version) uses for a call with these inputs [(name, type, size, ndim)] and outputs "
        "[(name, type)]. The one place mhc-aot computes MLX's key.");
  m.def("libcxx_string_hash", &libcxx_string_hash, py::arg("s"),
        "libc++'s std::hash<std::string> (CityHash64 variant, 64-bit size_t): what MLX on macOS hashes "
        "kernel sources with. Reimplemented so the key is the same on every platform.");
  m.def("metal_preload", &metal_preload, py::arg("metallib_path"), py::arg("library_name"),
        py::arg("function_name"), py::arg("buffer_names"), py::arg("threads_per_threadgroup"),
        "Load metallib_path into MLX's Metal library cache under library_name, check that function_name "
        "exists with these buffer arguments in order and can run threads_per_threadgroup threads, and "
        "build MLX's pipeline for it. {'available': False, 'reason': ...} where this shim has no MLX Metal.");
  m.def("nvtx_available", &nvtx_available, "Whether this build has NVTX ranges, and why not.");
  m.def("nvtx_range_push", &nvtx_range_push, py::arg("name"),
        "Push a named NVTX range on this thread (Nsight tools show it); -1 if built without NVTX.");
  m.def("nvtx_range_pop", &nvtx_range_pop, "Pop this thread's innermost NVTX range; -1 if built without NVTX.");
}
