// The launchers the CUDA backend calls: one set per storage combination (kernels_<combo>.cu,
// each its own translation unit so that nvcc builds them in parallel) and the norm stages
// (norm_kernels.cu). Every launcher only enqueues work on `stream`; errors surface through
// cudaGetLastError() in the backend.
#pragma once

#include <cuda_runtime_api.h>

#include "multi_tensor_apply.cuh"
#include "sgd_functor.cuh"

namespace fastsgd {
namespace gpu {

// One storage combination's kernels.
struct ComboLaunchers {
  // A pass launch: blocks = chunks of `meta`; `clip` is the device clip table or null.
  void (*pass)(const PassVariant& v, const LaunchMeta& meta, const StepScalars& s, const double* clip,
               cudaStream_t stream);
  // Stage 1 of a norm clip or measure: partials[meta.partial_base + b] for every chunk b of `meta`.
  void (*sum_squares)(bool merge, const LaunchMeta& meta, const StepScalars& s, Pair* partials,
                      cudaStream_t stream);
};

const ComboLaunchers& launchers_f32();
const ComboLaunchers& launchers_f64();
const ComboLaunchers& launchers_f16_f32();
const ComboLaunchers& launchers_f16_f16();
const ComboLaunchers& launchers_bf16_f32();
const ComboLaunchers& launchers_bf16_bf16();

// Stage 2: sums[aux] for every tensor of a stage-1 launch, and clip rows when per_tensor.
void launch_tensor_norms(const LaunchMeta& meta, bool per_tensor, double clipnorm, const Pair* partials,
                         Pair* sums, double* clip, cudaStream_t stream);
// Stage 3 (global_clipnorm): clip row 0 = (global_clip_scale(sum of sums[0, rows)), 1).
void launch_global_clip(int32_t rows, double clipnorm, bool narrow, const Pair* sums, double* clip,
                        cudaStream_t stream);

// cudaSuccess when this build has kernel code the current device can run.
cudaError_t probe_kernels();

}  // namespace gpu
}  // namespace fastsgd
