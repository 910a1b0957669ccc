// mhc_aot._shim: the small native side of mhc-aot.
// Reports build facts for `mhc info`. (CUDA driver checks and the Metal preload live here too.)
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

namespace {

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
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                  "." + std::to_string(PYBIND11_VERSION_PATCH);
  return d;
}

}  // namespace

PYBIND11_MODULE(_shim, m) {
  m.doc() = "mhc-aot native shim: build facts, CUDA driver checks, Metal library preload";
  m.def("build_info", &build_info, "Compiler and binding facts of this build of the shim.");
}
