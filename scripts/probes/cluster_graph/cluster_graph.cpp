// Probe (issue 6, docs/HISTORY.md session 37): can a kernel with thread block clusters run inside MLX's
// CUDA graphs without the graph cache launching later kernels in clusters? MLX 0.32.4 keys a kernel node
// of its graphs by "K" alone and updates a cached executable graph in place; a node whose kernel has a
// cluster shape then hands it to the next graph's kernel at that place (mhc_aot/dispatch.py, strategy
// `cluster`). A child-graph node is keyed by its nodes *with* their cluster shapes (subgraph_to_key in
// mlx/backend/cuda/device.cpp: "(K8)" for a kernel in clusters of 8), and CommandEncoder::add_graph_node
// is public (mlx/backend/cuda/device.h). This MLX primitive launches a precompiled cubin's kernel either as
// MLX's own custom-kernel call does (a plain kernel node, the cluster shape on it: mode 0) or as a child
// graph of one kernel node with the cluster shape set on that node (mode 1).
// Python: cluster_graph.kernel(name, cubin, inputs, output_shapes, output_dtypes, iscalars, fscalars,
// grid_blocks, block, cluster_x, smem, mode) -> list of arrays (scalars: the ints, then the floats).
// Built on the device against the CUDA MLX wheel's headers and libmlx.so with nanobind 3.1.0 in MLX's nanobind
// domain (NB_DOMAIN=mlx), so mx.array is one type in both modules: build.sh (checked on the CPU build of MLX here).
#include <cuda.h>
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cuda/allocator.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

void check(CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) {
    const char* s = nullptr;
    cuGetErrorString(r, &s);
    throw std::runtime_error(std::string(what) + ": " + (s ? s : "?"));
  }
}

void* device_ptr(const mx::array& a) {
  auto* buf = static_cast<mx::cu::CudaBuffer*>(const_cast<mx::array&>(a).buffer().ptr());
  return static_cast<char*>(buf->data) + a.offset();
}

CUfunction function_of(const std::string& name, const std::string& cubin, int smem) {
  static std::mutex mu;
  static std::unordered_map<std::string, CUfunction> cache;
  std::lock_guard<std::mutex> lock(mu);
  const std::string key = name + "#" + std::to_string(std::hash<std::string>{}(cubin));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  CUmodule mod;
  check(cuModuleLoadData(&mod, cubin.data()), "cuModuleLoadData");
  CUfunction f;
  check(cuModuleGetFunction(&f, mod, name.c_str()), "cuModuleGetFunction");
  if (smem > 48 * 1024) check(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                              "cuFuncSetAttribute");
  cache[key] = f;
  return f;
}

class ClusterKernel : public mx::Primitive {
 public:
  ClusterKernel(mx::Stream s, std::string name, std::string cubin, std::vector<int> iscalars,
                std::vector<float> fscalars, std::vector<int> grid, std::vector<int> block, int cluster, int smem,
                int mode)
      : mx::Primitive(s), name_(std::move(name)), cubin_(std::move(cubin)), is_(std::move(iscalars)),
        fs_(std::move(fscalars)), grid_(std::move(grid)), block_(std::move(block)), cluster_(cluster),
        smem_(smem), mode_(mode) {}

  void eval_cpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("cluster_graph.kernel runs on the GPU only");
  }

  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cu::get_command_encoder(stream());
    for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
    for (const auto& in : inputs) {
      if (!in.flags().row_contiguous) throw std::runtime_error("cluster_graph.kernel: inputs must be row contiguous");
      enc.set_input_array(in);
    }
    for (const auto& out : outputs) enc.set_output_array(out);
    std::vector<CUdeviceptr> ptrs;
    for (const auto& in : inputs) ptrs.push_back(reinterpret_cast<CUdeviceptr>(device_ptr(in)));
    for (const auto& out : outputs) ptrs.push_back(reinterpret_cast<CUdeviceptr>(device_ptr(out)));
    std::vector<int> iv = is_;
    std::vector<float> fv = fs_;
    std::vector<void*> args;
    for (auto& p : ptrs) args.push_back(&p);
    for (auto& v : iv) args.push_back(&v);
    for (auto& v : fv) args.push_back(&v);
    CUfunction f = function_of(name_, cubin_, smem_);
    const dim3 grid(grid_[0], grid_[1], grid_[2]), block(block_[0], block_[1], block_[2]);
    if (mode_ == 0) {  // as MLX's custom-kernel call: a kernel node (here with the cluster shape on it)
      enc.add_kernel_node_raw(f, grid, block, dim3(cluster_, 1, 1), smem_, args.data());
      return;
    }
    // mode 1: a child graph of one kernel node, its cluster shape set on the node, so MLX's key of the
    // parent graph names it ("(K8)") and no cached graph with a plain kernel there is updated with it
    CUgraph child;
    check(cuGraphCreate(&child, 0), "cuGraphCreate");
    CUDA_KERNEL_NODE_PARAMS p;
    std::memset(&p, 0, sizeof(p));
    p.func = f;
    p.gridDimX = grid.x, p.gridDimY = grid.y, p.gridDimZ = grid.z;
    p.blockDimX = block.x, p.blockDimY = block.y, p.blockDimZ = block.z;
    p.sharedMemBytes = smem_;
    p.kernelParams = args.data();
    CUgraphNode node;
    check(cuGraphAddKernelNode(&node, child, nullptr, 0, &p), "cuGraphAddKernelNode");
    CUlaunchAttributeValue v;
    std::memset(&v, 0, sizeof(v));
    v.clusterDim.x = cluster_, v.clusterDim.y = 1, v.clusterDim.z = 1;
    check(cuGraphKernelNodeSetAttribute(node, CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, &v),
          "cuGraphKernelNodeSetAttribute");
    enc.add_graph_node(reinterpret_cast<cudaGraph_t>(child));  // cloned into the parent (or launched)
    check(cuGraphDestroy(child), "cuGraphDestroy");
  }

  const char* name() const override { return "ClusterKernel"; }
  bool is_equivalent(const mx::Primitive&) const override { return false; }

 private:
  std::string name_, cubin_;
  std::vector<int> is_;
  std::vector<float> fs_;
  std::vector<int> grid_, block_;
  int cluster_, smem_, mode_;
};

std::vector<mx::array> kernel(const std::string& name, nb::bytes cubin, const std::vector<mx::array>& inputs,
                              const std::vector<std::vector<int>>& output_shapes,
                              const std::vector<mx::Dtype>& output_dtypes, const std::vector<int>& iscalars,
                              const std::vector<float>& fscalars, const std::vector<int>& grid,
                              const std::vector<int>& block, int cluster, int smem, int mode) {
  if (output_shapes.size() != output_dtypes.size()) throw std::invalid_argument("output_shapes vs output_dtypes");
  if (grid.size() != 3 || block.size() != 3) throw std::invalid_argument("grid and block: three ints each");
  std::vector<mx::Shape> shapes;
  for (const auto& s : output_shapes) shapes.emplace_back(s.begin(), s.end());
  auto s = mx::default_stream(mx::Device::gpu);
  auto prim = std::make_shared<ClusterKernel>(s, name, std::string(cubin.c_str(), cubin.size()), iscalars, fscalars,
                                              grid, block, cluster, smem, mode);
  return mx::array::make_arrays(std::move(shapes), output_dtypes, prim, inputs);
}

}  // namespace

NB_MODULE(cluster_graph, m) {
  nb::module_::import_("mlx.core");
  m.def("kernel", &kernel, nb::arg("name"), nb::arg("cubin"), nb::arg("inputs"), nb::arg("output_shapes"),
        nb::arg("output_dtypes"), nb::arg("iscalars"), nb::arg("fscalars"), nb::arg("grid"), nb::arg("block"),
        nb::arg("cluster"), nb::arg("smem"), nb::arg("mode"));
}
