// mhc_aot._shim: declarations shared by the shim's translation units.
//   shim.cpp           the module, build facts
//   cuda_driver.cpp    CUDA driver opened at run time (dlopen): device facts, cubin load checks
//   metal_preload.cpp  MLX's custom-kernel library key, and (macOS, linked to libmlx) the preload
//                      of mhc_aot.metallib into MLX's Metal library cache
//   nvtx.cpp           NVTX ranges naming the stages for Nsight tools
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

namespace mhc_shim {

namespace py = pybind11;

// Every "unavailable" answer has this shape, so callers never need try/except to ask.
py::dict unavailable(const std::string& reason);

py::dict cuda_device_facts(int ordinal);
py::dict cuda_check_cubin(const py::bytes& image, const std::string& kernel_name, int ordinal);

// (name, MLX type string, element count, ndim) of one input of an mx.fast.metal_kernel call.
using KernelInput = std::tuple<std::string, std::string, long long, int>;
// (name, MLX type string) of one output.
using KernelOutput = std::tuple<std::string, std::string>;

py::dict metal_kernel_key(const std::string& name, const std::vector<KernelInput>& inputs,
                          const std::vector<KernelOutput>& outputs, const std::string& source,
                          const std::string& header, int compile_options);
unsigned long long libcxx_string_hash(const std::string& s);
py::dict metal_preload(const std::string& metallib_path, const std::string& library_name,
                       const std::string& function_name, const std::vector<std::string>& buffer_names,
                       int threads_per_threadgroup);
py::dict metal_build_facts();

py::dict nvtx_available();
int nvtx_range_push(const std::string& name);  // depth of the new range, or -1 without NVTX
int nvtx_range_pop();

}  // namespace mhc_shim
