// MLX's Metal custom-kernel cache, and the preload of mhc_aot.metallib into it.
//
// How mx.fast.metal_kernel finds a kernel (MLX 0.32.4, the pinned version; source lines from
// mlx/backend/common/metal_kernel.cpp and mlx/backend/metal/custom_kernel.cpp):
//   1. metal_kernel() names the kernel  "custom_kernel_" + name, then per input "_" + its type
//      string (+ "s" if 0-d, "c" if fewer than 8 elements), then per output "_" + its type string;
//      and generates `source_` = header + "[[kernel]] void <kernel_name>(\n" + one line per buffer
//      (inputs `const device|constant T* name [[buffer(i)]]`, then outputs `device T* name`) + the
//      body + "\n}\n"   (write_signature()).
//   2. CustomKernel::eval_gpu() looks the library up in the device's library cache under
//        lib_name = fmt::format("{}_{:x}_{}", name_, std::hash<std::string>{}(source_), compile_options_)
//      with d.get_library(lib_name, compile_options_, builder): the builder (JIT compile of
//      source_) runs only when lib_name is absent; then d.get_kernel(name_, lib) builds the
//      pipeline of the function called name_ in that library; then it binds inputs to buffers
//      0..k-1 and outputs to buffers k.. in order, and dispatch_threads(grid, threadgroup).
// So a library registered beforehand under lib_name, containing a function named kernel_name,
// runs instead of the JIT: that is the preload. metal_kernel_key() below is the one place this
// key is computed (shown by `mhc info`, tested against MLX's own generated source on Linux).
// The stub body mhc_aot.metal passes is a `#error` naming the problem, so a key mismatch (MLX
// changed) fails loudly at the first launch instead of running anything else.
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>

#include "shim.h"

#if defined(MHC_AOT_WITH_MLX_METAL)
#include <Metal/Metal.hpp>

#include "mlx/backend/metal/device.h"
#include "mlx/version.h"
#endif

namespace mhc_shim {

namespace {

// ---- libc++'s std::hash<std::string> on 64-bit targets: __murmur2_or_cityhash<size_t, 64>
// (<__functional/hash.h>, the libc++ ABI v1 that macOS ships). MLX on macOS hashes kernel sources
// with it; reimplemented here so the key is computable (and testable) on any platform.
using u64 = std::uint64_t;
constexpr u64 K0 = 0xc3a5c85c97cb3127ULL, K1 = 0xb492b66fbe98f273ULL, K2 = 0x9ae16a3b2f90404fULL,
              K3 = 0xc949d7c7509e6557ULL;

u64 load64(const char* p) {
  u64 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
std::uint32_t load32(const char* p) {
  std::uint32_t r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
u64 rotate(u64 v, int s) { return s == 0 ? v : ((v >> s) | (v << (64 - s))); }
u64 rotate_by_at_least_1(u64 v, int s) { return (v >> s) | (v << (64 - s)); }
u64 shift_mix(u64 v) { return v ^ (v >> 47); }
u64 hash_len_16(u64 u, u64 v) {
  const u64 mul = 0x9ddfea08eb382d69ULL;
  u64 a = (u ^ v) * mul;
  a ^= (a >> 47);
  u64 b = (v ^ a) * mul;
  b ^= (b >> 47);
  return b * mul;
}
u64 hash_len_0_to_16(const char* s, u64 len) {
  if (len > 8) {
    const u64 a = load64(s), b = load64(s + len - 8);
    return hash_len_16(a, rotate_by_at_least_1(b + len, static_cast<int>(len))) ^ b;
  }
  if (len >= 4) {
    const std::uint32_t a = load32(s), b = load32(s + len - 4);
    return hash_len_16(len + (a << 3), b);  // a << 3 in 32 bits, as libc++ ABI v1 does
  }
  if (len > 0) {
    const unsigned char a = static_cast<unsigned char>(s[0]), b = static_cast<unsigned char>(s[len >> 1]),
                        c = static_cast<unsigned char>(s[len - 1]);
    const std::uint32_t y = static_cast<std::uint32_t>(a) + (static_cast<std::uint32_t>(b) << 8);
    const std::uint32_t z = static_cast<std::uint32_t>(len) + (static_cast<std::uint32_t>(c) << 2);
    return shift_mix(y * K2 ^ z * K3) * K2;
  }
  return K2;
}
u64 hash_len_17_to_32(const char* s, u64 len) {
  const u64 a = load64(s) * K1, b = load64(s + 8), c = load64(s + len - 8) * K2, d = load64(s + len - 16) * K0;
  return hash_len_16(rotate(a - b, 43) + rotate(c, 30) + d, a + rotate(b ^ K3, 20) - c + len);
}
std::pair<u64, u64> weak_hash_32(u64 w, u64 x, u64 y, u64 z, u64 a, u64 b) {
  a += w;
  b = rotate(b + a + z, 21);
  const u64 c = a;
  a += x;
  a += y;
  b += rotate(a, 44);
  return {a + z, b + c};
}
std::pair<u64, u64> weak_hash_32(const char* s, u64 a, u64 b) {
  return weak_hash_32(load64(s), load64(s + 8), load64(s + 16), load64(s + 24), a, b);
}
u64 hash_len_33_to_64(const char* s, u64 len) {
  u64 z = load64(s + 24);
  u64 a = load64(s) + (len + load64(s + len - 16)) * K0;
  u64 b = rotate(a + z, 52);
  u64 c = rotate(a, 37);
  a += load64(s + 8);
  c += rotate(a, 7);
  a += load64(s + 16);
  const u64 vf = a + z, vs = b + rotate(a, 31) + c;
  a = load64(s + 16) + load64(s + len - 32);
  z += load64(s + len - 8);
  b = rotate(a + z, 52);
  c = rotate(a, 37);
  a += load64(s + len - 24);
  c += rotate(a, 7);
  a += load64(s + len - 16);
  const u64 wf = a + z, ws = b + rotate(a, 31) + c;
  const u64 r = shift_mix((vf + ws) * K2 + (wf + vs) * K0);
  return shift_mix(r * K0 + vs) * K2;
}
u64 cityhash64(const char* s, u64 len) {
  if (len <= 32) return len <= 16 ? hash_len_0_to_16(s, len) : hash_len_17_to_32(s, len);
  if (len <= 64) return hash_len_33_to_64(s, len);
  u64 x = load64(s + len - 40);
  u64 y = load64(s + len - 16) + load64(s + len - 56);
  u64 z = hash_len_16(load64(s + len - 48) + len, load64(s + len - 24));
  std::pair<u64, u64> v = weak_hash_32(s + len - 64, len, z);
  std::pair<u64, u64> w = weak_hash_32(s + len - 32, y + K1, x);
  x = x * K1 + load64(s);
  len = (len - 1) & ~static_cast<u64>(63);
  do {
    x = rotate(x + y + v.first + load64(s + 8), 37) * K1;
    y = rotate(y + v.second + load64(s + 48), 42) * K1;
    x ^= w.second;
    y += v.first + load64(s + 40);
    z = rotate(z + w.first, 33) * K1;
    v = weak_hash_32(s, v.second * K1, x + w.first);
    w = weak_hash_32(s + 32, z + w.second, y + load64(s + 16));
    std::swap(z, x);
    s += 64;
    len -= 64;
  } while (len != 0);
  return hash_len_16(hash_len_16(v.first, w.first) + shift_mix(y) * K1 + z, hash_len_16(v.second, w.second) + x);
}

// MLX's `max_constant_array_size`: inputs with fewer elements are bound in the constant space.
constexpr long long MLX_MAX_CONSTANT_ARRAY_SIZE = 8;

// The thread attributes metal_kernel() adds to the signature when the body mentions them, in
// MLX's order (metal_kernel.cpp, `metal_attributes`).
const std::pair<const char*, const char*> MLX_ATTRIBUTES[] = {
    {"dispatch_quadgroups_per_threadgroup", "uint"}, {"dispatch_simdgroups_per_threadgroup", "uint"},
    {"dispatch_threads_per_threadgroup", "uint3"},   {"grid_origin", "uint3"},
    {"grid_size", "uint3"},                          {"quadgroup_index_in_threadgroup", "uint"},
    {"quadgroups_per_threadgroup", "uint"},          {"simdgroup_index_in_threadgroup", "uint"},
    {"simdgroups_per_threadgroup", "uint"},          {"thread_execution_width", "uint"},
    {"thread_index_in_quadgroup", "uint"},           {"thread_index_in_simdgroup", "uint"},
    {"thread_index_in_threadgroup", "uint"},         {"thread_position_in_grid", "uint3"},
    {"thread_position_in_threadgroup", "uint3"},     {"threadgroup_position_in_grid", "uint3"},
    {"threadgroups_per_grid", "uint3"},              {"threads_per_grid", "uint3"},
    {"threads_per_simdgroup", "uint"},               {"threads_per_threadgroup", "uint3"},
};

// Decimal text by snprintf. With MLX's CUDA build imported first, metal_kernel_key crashed the
// interpreter on the device (H200, gcc 13.3, session 25) while it formatted with std::to_string and
// std::ostringstream; the same function formatting with snprintf passes there. Which libstdc++ state
// the crash came from was not isolated (LD_DEBUG showed none of this library's symbols bound to
// libmlx); plain C formatting keeps the key off it. tests/test_shim.py runs the key in a child process
// with MLX imported first.
std::string decimal(long long v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%lld", v);
  return buf;
}

}  // namespace

unsigned long long libcxx_string_hash(const std::string& s) { return cityhash64(s.data(), s.size()); }

py::dict metal_kernel_key(const std::string& name, const std::vector<KernelInput>& inputs,
                          const std::vector<KernelOutput>& outputs, const std::string& source,
                          const std::string& header, int compile_options) {
  if (outputs.empty()) throw std::invalid_argument("metal_kernel_key: MLX requires at least one output");
  // metal_kernel(): which shape/stride/ndim buffers and thread attributes the body asks for
  std::vector<std::tuple<bool, bool, bool>> shape_infos;
  for (const auto& in : inputs) {
    const std::string& n = std::get<0>(in);
    shape_infos.emplace_back(source.find(n + "_shape") != std::string::npos,
                             source.find(n + "_strides") != std::string::npos,
                             source.find(n + "_ndim") != std::string::npos);
  }
  std::vector<std::string> attributes;
  for (const auto& [attr, type] : MLX_ATTRIBUTES) {
    if (source.find(attr) != std::string::npos) attributes.push_back(std::string("  ") + type + " " + attr + " [[" + attr + "]]");
  }
  // the kernel's name: custom_kernel_<name>_<input types + size class>_<output types>
  std::string kernel_name = "custom_kernel_" + name;
  for (const auto& [n, type, size, ndim] : inputs) {
    kernel_name += "_" + type;
    if (ndim == 0) kernel_name += "s";
    else if (size < MLX_MAX_CONSTANT_ARRAY_SIZE) kernel_name += "c";
  }
  for (const auto& out : outputs) kernel_name += "_" + std::get<1>(out);
  // write_signature() without template arguments and with non-atomic outputs
  std::string src = header + "[[kernel]] void " + kernel_name + "(\n";
  size_t index = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& [n, type, size, ndim] = inputs[i];
    src += std::string("  const ") + (size < MLX_MAX_CONSTANT_ARRAY_SIZE ? "constant" : "device") + " " + type +
           (ndim == 0 ? "&" : "*") + " " + n + " [[buffer(" + decimal(index++) + ")]],\n";
    if (ndim > 0) {
      if (std::get<0>(shape_infos[i])) src += "  const constant int* " + n + "_shape [[buffer(" + decimal(index++) + ")]],\n";
      if (std::get<1>(shape_infos[i])) src += "  const constant int64_t* " + n + "_strides [[buffer(" + decimal(index++) + ")]],\n";
      if (std::get<2>(shape_infos[i])) src += "  const constant int& " + n + "_ndim [[buffer(" + decimal(index++) + ")]],\n";
    }
  }
  for (const auto& [n, type] : outputs) {
    src += "  device " + type + "* " + n + " [[buffer(" + decimal(index) + ")]]";
    // MLX's condition, kept verbatim (it compares a buffer index with an array count)
    src += (index < inputs.size() + outputs.size() - 1 || !attributes.empty()) ? ",\n" : ") {\n";
    ++index;
  }
  for (size_t i = 0; i < attributes.size(); ++i) src += attributes[i] + (i + 1 < attributes.size() ? ",\n" : ") {\n");
  src += source + "\n}\n";

  const unsigned long long portable = cityhash64(src.data(), src.size());
  unsigned long long h = portable;
  std::string impl = "libc++ CityHash64 (reimplemented; MLX on macOS uses libc++'s std::hash)";
#if defined(_LIBCPP_VERSION) && SIZE_MAX == UINT64_MAX
  h = std::hash<std::string>{}(src);  // this process's libc++: what libmlx.dylib computes
  impl = "std::hash<std::string> of this build's libc++";
#endif
  // snprintf, not an ostringstream: see decimal()
  char hex[32];
  std::snprintf(hex, sizeof(hex), "_%llx_", h);
  const std::string library_name = kernel_name + hex + decimal(compile_options);
  py::dict d;
  d["kernel_name"] = kernel_name;
  d["source"] = src;
  d["source_hash"] = h;
  d["library_name"] = library_name;
  d["hash_impl"] = impl;
  d["portable_hash_matches"] = portable == h;
  d["uses_shape_buffers_or_attributes"] = !attributes.empty() || index != inputs.size() + outputs.size();
  return d;
}

#if defined(MHC_AOT_WITH_MLX_METAL)

py::dict metal_build_facts() {
  py::dict d;
  d["preload"] = true;
  d["mlx_headers"] = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
                     std::to_string(MLX_VERSION_PATCH);
  d["how"] = "linked against libmlx; mlx::core::metal::Device::get_library(name, path) / get_kernel(name, lib)";
  return d;
}

py::dict metal_preload(const std::string& metallib_path, const std::string& library_name,
                       const std::string& function_name, const std::vector<std::string>& buffer_names,
                       int threads_per_threadgroup) {
  const std::string what = "mhc-aot Metal preload of " + function_name + " from " + metallib_path + ": ";
  auto& d = mlx::core::metal::device(mlx::core::Device::gpu);
  // MLX loads the .metallib (a path ending in ".metallib") and caches it under library_name:
  // device.cpp, Device::get_library(name, path) -> load_library() -> library_map_.insert.
  MTL::Library* lib = nullptr;
  try {
    lib = d.get_library(library_name, metallib_path);
  } catch (const std::exception& e) {
    throw std::runtime_error(what + e.what());
  }
  NS::SharedPtr<NS::AutoreleasePool> pool = NS::TransferPtr(NS::AutoreleasePool::alloc()->init());
  NS::SharedPtr<MTL::Function> fn =
      NS::TransferPtr(lib->newFunction(NS::String::string(function_name.c_str(), NS::UTF8StringEncoding)));
  if (!fn) {
    throw std::runtime_error(what + "the metallib has no function of that name: it was built for another "
                                    "kernel ABI or MLX naming; rebuild mhc-aot with this MLX");
  }
  // Argument binding: MLX binds inputs then outputs to buffers 0, 1, ... in call order; the
  // compiled function must declare exactly those buffers, with the same names, in that order.
  MTL::ComputePipelineReflection* refl = nullptr;
  NS::Error* err = nullptr;
  NS::SharedPtr<MTL::ComputePipelineState> probe = NS::TransferPtr(
      d.mtl_device()->newComputePipelineState(fn.get(), MTL::PipelineOptionBindingInfo, &refl, &err));
  if (!probe || !refl) {
    throw std::runtime_error(what + "pipeline creation failed: " +
                             (err ? err->localizedDescription()->utf8String() : std::string("unknown error")));
  }
  std::vector<std::string> found(buffer_names.size());
  std::vector<std::string> extra;
  NS::Array* bindings = refl->bindings();
  for (NS::UInteger i = 0; i < bindings->count(); ++i) {
    auto* b = bindings->object<MTL::Binding>(i);
    if (b->type() != MTL::BindingTypeBuffer) continue;
    const std::string bname = b->name()->utf8String();
    const NS::UInteger idx = b->index();
    if (idx < found.size()) found[idx] = bname;
    else extra.push_back(bname + "@" + std::to_string(idx));
  }
  if (found != buffer_names || !extra.empty()) {
    std::string msg = what + "buffer arguments do not match MLX's binding order. expected [";
    for (const auto& s : buffer_names) msg += s + " ";
    msg += "], the metallib declares [";
    for (const auto& s : found) msg += (s.empty() ? "<none>" : s) + " ";
    for (const auto& s : extra) msg += s + " ";
    throw std::runtime_error(msg + "]: rebuild mhc-aot (stale or mismatched mhc_aot.metallib)");
  }
  // MLX's own pipeline for (function, library), cached where eval_gpu will fetch it.
  MTL::ComputePipelineState* kernel = nullptr;
  try {
    kernel = d.get_kernel(function_name, lib);
  } catch (const std::exception& e) {
    throw std::runtime_error(what + e.what());
  }
  const long long max_threads = static_cast<long long>(kernel->maxTotalThreadsPerThreadgroup());
  if (max_threads < threads_per_threadgroup) {
    throw std::runtime_error(what + "the pipeline allows " + std::to_string(max_threads) +
                             " threads per threadgroup, the kernel needs " + std::to_string(threads_per_threadgroup));
  }
  py::dict r;
  r["available"] = true;
  r["library_name"] = library_name;
  r["function_name"] = function_name;
  r["max_threads_per_threadgroup"] = max_threads;
  r["thread_execution_width"] = static_cast<long long>(kernel->threadExecutionWidth());
  r["static_threadgroup_bytes"] = static_cast<long long>(kernel->staticThreadgroupMemoryLength());
  r["buffers"] = buffer_names;
  return r;
}

#else

py::dict metal_build_facts() {
  py::dict d;
  d["preload"] = false;
#if defined(MHC_AOT_NO_PRELOAD_REASON)
  d["reason"] = MHC_AOT_NO_PRELOAD_REASON;
#elif defined(__APPLE__)
  d["reason"] = "this shim was built without MLX's C++ headers and libmlx (mlx-metal not found at build time)";
#else
  d["reason"] = "Metal exists only on macOS";
#endif
  return d;
}

py::dict metal_preload(const std::string&, const std::string&, const std::string&, const std::vector<std::string>&,
                       int) {
  return unavailable(metal_build_facts()["reason"].cast<std::string>() + ": no Metal library preload");
}

#endif

}  // namespace mhc_shim
