// The probe's two kernels (scripts/probes/cluster_graph/probe.py): each CTA's thread 0 writes one value.
// cl_fill: in clusters of 8, out[block] = 100 + the CTA's rank in its cluster; with -DCOMPILE_TIME_CLUSTER
// the cluster shape is compile-time (__cluster_dims__, the only kind MLX's custom-kernel call can launch),
// else it comes with the launch. plain_fill: out[block] = block.
#ifdef COMPILE_TIME_CLUSTER
#define DIMS __cluster_dims__(8, 1, 1)
#else
#define DIMS
#endif
extern "C" __global__ void DIMS cl_fill(const float* dummy, float* out) {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  if (threadIdx.x == 0) out[blockIdx.x] = 100.0f + r;
}
extern "C" __global__ void plain_fill(const float* dummy, float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x;
}
