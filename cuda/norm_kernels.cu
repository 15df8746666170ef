// Stages 2 and 3 of norm clipping (stage 1 is the per-combination sum-of-squares kernel):
// per-tensor sums and clip coefficients, and the global clip scale. Fixed block size and a
// fixed summation order (multi_tensor_apply.cuh), so results do not vary run to run.
#include <cuda_runtime.h>

#include "cuda_kernels.h"
#include "multi_tensor_apply.cuh"
#include "sgd_functor.cuh"

namespace fastsgd {
namespace gpu {
namespace {

// Block b: tensor b of a stage-1 launch.
__global__ void __launch_bounds__(kBlockThreads)
    tensor_norms_kernel(const __grid_constant__ LaunchMeta meta, const Pair* __restrict__ partials,
                        Pair* __restrict__ sums, double* __restrict__ clip, bool per_tensor, double clipnorm) {
  __shared__ Pair buf[kBlockThreads];
  const int b = int(blockIdx.x);
  const Pair sum = block_reduce(buf, TensorNormStage::thread_sum(meta, b, int(threadIdx.x), partials));
  if (threadIdx.x == 0) TensorNormStage::finish(meta, b, sum, per_tensor, clipnorm, sums, clip);
}

// One thread: the rows are added in task order, exactly as the host adds measured sums.
__global__ void global_clip_kernel(int32_t rows, const Pair* __restrict__ sums, double* __restrict__ clip,
                                   double clipnorm, bool narrow) {
  GlobalNormStage::finish(GlobalNormStage::total(rows, sums), clipnorm, narrow, clip);
}

}  // namespace

void launch_tensor_norms(const LaunchMeta& meta, bool per_tensor, double clipnorm, const Pair* partials,
                         Pair* sums, double* clip, cudaStream_t stream) {
  if (meta.count <= 0) return;
  tensor_norms_kernel<<<unsigned(meta.count), kBlockThreads, 0, stream>>>(meta, partials, sums, clip, per_tensor,
                                                                         clipnorm);
}

void launch_global_clip(int32_t rows, double clipnorm, bool narrow, const Pair* sums, double* clip,
                        cudaStream_t stream) {
  global_clip_kernel<<<1, 1, 0, stream>>>(rows, sums, clip, clipnorm, narrow);
}

cudaError_t probe_kernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, global_clip_kernel);
}

}  // namespace gpu
}  // namespace fastsgd
