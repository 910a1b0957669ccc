// The CUDA driver API opened at run time with dlopen("libcuda.so.1"): no cuda.h and no link-time
// dependency, so the shim imports on machines without a driver (CI, macOS) and answers
// {"available": False, "reason": ...} there. The typedefs and enum values below are the driver
// API's stable ABI (cuda.h: CUresult is an int, CUdevice an int, CUcontext/CUmodule/CUfunction
// opaque pointers; attribute numbers as listed).
#include <string>

#include "shim.h"

#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace mhc_shim {

#if defined(__linux__)
namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;

// CUdevice_attribute values (cuda.h)
constexpr int ATTR_MAX_SHARED_MEMORY_PER_BLOCK = 8;
constexpr int ATTR_WARP_SIZE = 10;
constexpr int ATTR_CLOCK_RATE = 13;
constexpr int ATTR_MULTIPROCESSOR_COUNT = 16;
constexpr int ATTR_MEMORY_CLOCK_RATE = 36;
constexpr int ATTR_GLOBAL_MEMORY_BUS_WIDTH = 37;
constexpr int ATTR_L2_CACHE_SIZE = 38;
constexpr int ATTR_MAX_THREADS_PER_MULTIPROCESSOR = 39;
constexpr int ATTR_COMPUTE_CAPABILITY_MAJOR = 75;
constexpr int ATTR_COMPUTE_CAPABILITY_MINOR = 76;
constexpr int ATTR_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81;
constexpr int ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97;

// CUfunction_attribute values (cuda.h)
constexpr int FUNC_MAX_THREADS_PER_BLOCK = 0;
constexpr int FUNC_SHARED_SIZE_BYTES = 1;
constexpr int FUNC_CONST_SIZE_BYTES = 2;
constexpr int FUNC_LOCAL_SIZE_BYTES = 3;
constexpr int FUNC_NUM_REGS = 4;
constexpr int FUNC_PTX_VERSION = 5;
constexpr int FUNC_BINARY_VERSION = 6;

struct Driver {
  std::string error;  // empty when every entry point below was found and cuInit succeeded
  CUresult (*cuInit)(unsigned) = nullptr;
  CUresult (*cuDriverGetVersion)(int*) = nullptr;
  CUresult (*cuDeviceGetCount)(int*) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDeviceGetName)(char*, int, CUdevice) = nullptr;
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice) = nullptr;
  CUresult (*cuDeviceTotalMem)(size_t*, CUdevice) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice) = nullptr;
  CUresult (*cuCtxPushCurrent)(CUcontext) = nullptr;
  CUresult (*cuCtxPopCurrent)(CUcontext*) = nullptr;
  CUresult (*cuModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*cuModuleUnload)(CUmodule) = nullptr;
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*cuFuncGetAttribute)(int*, int, CUfunction) = nullptr;
  CUresult (*cuGetErrorName)(CUresult, const char**) = nullptr;
  CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;

  std::string describe(CUresult r) const {
    const char* name = nullptr;
    const char* text = nullptr;
    if (cuGetErrorName) cuGetErrorName(r, &name);
    if (cuGetErrorString) cuGetErrorString(r, &text);
    return std::string(name ? name : "CUDA error") + " (" + std::to_string(r) + ")" + (text ? std::string(": ") + text : "");
  }
};

template <typename F>
bool load_symbol(void* lib, const char* name, F& fn, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn && error.empty()) error = std::string("libcuda.so.1 has no symbol ") + name + " (driver too old?)";
  return fn != nullptr;
}

// Opened once per process; the library stays loaded (as MLX's CUDA backend keeps it anyway).
const Driver& driver() {
  static const Driver d = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      d.error = std::string("no CUDA driver: dlopen(\"libcuda.so.1\") failed (") + (why ? why : "unknown") + ")";
      return d;
    }
    std::string& e = d.error;
    load_symbol(lib, "cuInit", d.cuInit, e);
    load_symbol(lib, "cuDriverGetVersion", d.cuDriverGetVersion, e);
    load_symbol(lib, "cuDeviceGetCount", d.cuDeviceGetCount, e);
    load_symbol(lib, "cuDeviceGet", d.cuDeviceGet, e);
    load_symbol(lib, "cuDeviceGetName", d.cuDeviceGetName, e);
    load_symbol(lib, "cuDeviceGetAttribute", d.cuDeviceGetAttribute, e);
    load_symbol(lib, "cuDeviceTotalMem_v2", d.cuDeviceTotalMem, e);
    load_symbol(lib, "cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain, e);
    load_symbol(lib, "cuDevicePrimaryCtxRelease_v2", d.cuDevicePrimaryCtxRelease, e);
    load_symbol(lib, "cuCtxPushCurrent_v2", d.cuCtxPushCurrent, e);
    load_symbol(lib, "cuCtxPopCurrent_v2", d.cuCtxPopCurrent, e);
    load_symbol(lib, "cuModuleLoadData", d.cuModuleLoadData, e);
    load_symbol(lib, "cuModuleUnload", d.cuModuleUnload, e);
    load_symbol(lib, "cuModuleGetFunction", d.cuModuleGetFunction, e);
    load_symbol(lib, "cuFuncGetAttribute", d.cuFuncGetAttribute, e);
    load_symbol(lib, "cuGetErrorName", d.cuGetErrorName, e);
    load_symbol(lib, "cuGetErrorString", d.cuGetErrorString, e);
    if (e.empty()) {
      const CUresult r = d.cuInit(0);
      if (r != 0) e = "CUDA driver present but cuInit failed: " + d.describe(r);
    }
    return d;
  }();
  return d;
}

// The device handle for `ordinal`, or an error message.
std::string get_device(const Driver& d, int ordinal, CUdevice& dev) {
  int count = 0;
  CUresult r = d.cuDeviceGetCount(&count);
  if (r != 0) return "cuDeviceGetCount failed: " + d.describe(r);
  if (ordinal < 0 || ordinal >= count)
    return "CUDA device " + std::to_string(ordinal) + " does not exist (the driver sees " + std::to_string(count) +
           " devices)";
  r = d.cuDeviceGet(&dev, ordinal);
  return r == 0 ? "" : "cuDeviceGet failed: " + d.describe(r);
}

}  // namespace

py::dict cuda_device_facts(int ordinal) {
  const Driver& d = driver();
  if (!d.error.empty()) return unavailable(d.error);
  CUdevice dev = 0;
  if (auto e = get_device(d, ordinal, dev); !e.empty()) return unavailable(e);
  py::dict f;
  f["available"] = true;
  f["device"] = ordinal;
  char name[256] = {0};
  d.cuDeviceGetName(name, sizeof(name) - 1, dev);
  f["name"] = std::string(name);
  auto attr = [&](int a) {
    int v = 0;
    return d.cuDeviceGetAttribute(&v, a, dev) == 0 ? v : -1;
  };
  const int major = attr(ATTR_COMPUTE_CAPABILITY_MAJOR), minor = attr(ATTR_COMPUTE_CAPABILITY_MINOR);
  f["compute_capability"] = py::make_tuple(major, minor);
  f["arch"] = "sm_" + std::to_string(major) + std::to_string(minor);
  f["sm_count"] = attr(ATTR_MULTIPROCESSOR_COUNT);
  f["l2_cache_bytes"] = attr(ATTR_L2_CACHE_SIZE);
  f["max_shared_memory_per_block"] = attr(ATTR_MAX_SHARED_MEMORY_PER_BLOCK);
  f["max_shared_memory_per_block_optin"] = attr(ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
  f["max_shared_memory_per_sm"] = attr(ATTR_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR);
  f["max_threads_per_sm"] = attr(ATTR_MAX_THREADS_PER_MULTIPROCESSOR);
  f["warp_size"] = attr(ATTR_WARP_SIZE);
  f["clock_khz"] = attr(ATTR_CLOCK_RATE);
  f["memory_clock_khz"] = attr(ATTR_MEMORY_CLOCK_RATE);
  f["memory_bus_width_bits"] = attr(ATTR_GLOBAL_MEMORY_BUS_WIDTH);
  size_t mem = 0;
  f["memory_bytes"] = d.cuDeviceTotalMem(&mem, dev) == 0 ? static_cast<long long>(mem) : -1LL;
  int version = 0;
  d.cuDriverGetVersion(&version);
  f["driver_version"] = std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
  return f;
}

py::dict cuda_check_cubin(const py::bytes& image, const std::string& kernel_name, int ordinal) {
  const Driver& d = driver();
  if (!d.error.empty()) {
    py::dict r = unavailable(d.error);
    r["ok"] = false;
    return r;
  }
  py::dict out;
  out["available"] = true;
  out["ok"] = false;
  out["kernel_name"] = kernel_name;
  CUdevice dev = 0;
  if (auto e = get_device(d, ordinal, dev); !e.empty()) {
    out["error"] = e;
    return out;
  }
  // PTX must be NUL-terminated; a cubin or fatbin ignores bytes past its ELF/fatbin image.
  std::string data = image;
  data.push_back('\0');
  CUcontext ctx = nullptr;
  CUresult r = d.cuDevicePrimaryCtxRetain(&ctx, dev);  // the context MLX's CUDA backend also uses
  if (r != 0) {
    out["error"] = "cuDevicePrimaryCtxRetain failed: " + d.describe(r);
    return out;
  }
  d.cuCtxPushCurrent(ctx);
  CUmodule mod = nullptr;
  r = d.cuModuleLoadData(&mod, data.data());
  if (r != 0) {
    out["error"] = "cuModuleLoadData failed: " + d.describe(r) + " (a binary for another GPU architecture, or corrupted)";
  } else {
    CUfunction fn = nullptr;
    r = d.cuModuleGetFunction(&fn, mod, kernel_name.c_str());
    if (r != 0) {
      out["error"] = "cuModuleGetFunction(\"" + kernel_name + "\") failed: " + d.describe(r) +
                     " (the binary does not export this kernel name)";
    } else {
      auto fattr = [&](int a) {
        int v = 0;
        return d.cuFuncGetAttribute(&v, a, fn) == 0 ? v : -1;
      };
      out["ok"] = true;
      out["registers"] = fattr(FUNC_NUM_REGS);
      out["static_shared_bytes"] = fattr(FUNC_SHARED_SIZE_BYTES);
      out["local_bytes"] = fattr(FUNC_LOCAL_SIZE_BYTES);
      out["const_bytes"] = fattr(FUNC_CONST_SIZE_BYTES);
      out["max_threads_per_block"] = fattr(FUNC_MAX_THREADS_PER_BLOCK);
      out["ptx_version"] = fattr(FUNC_PTX_VERSION);
      out["binary_version"] = fattr(FUNC_BINARY_VERSION);
    }
    d.cuModuleUnload(mod);
  }
  CUcontext popped = nullptr;
  d.cuCtxPopCurrent(&popped);
  d.cuDevicePrimaryCtxRelease(dev);
  return out;
}

#else  // not Linux

py::dict cuda_device_facts(int) { return unavailable("no CUDA driver query on this platform (Linux only)"); }

py::dict cuda_check_cubin(const py::bytes&, const std::string&, int) {
  py::dict r = unavailable("no CUDA driver on this platform (Linux only)");
  r["ok"] = false;
  return r;
}

#endif

}  // namespace mhc_shim
