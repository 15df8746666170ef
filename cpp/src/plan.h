// What one step asks the backend (CPU or CUDA) to do: a list of per-tensor passes that share
// one set of step scalars, and whether gradients must be measured first for a norm clip.
// The engine (sgd.cpp) builds the plan; backends only execute it.
#pragma once

#include <cstdint>
#include <vector>

#include "fastsgd/dtype.h"
#include "fastsgd/step.h"
#include "fastsgd/tensor.h"

namespace fastsgd {
namespace detail {

// How an update pass keeps a variable: as is, beside a float32 master, or as the high half of
// a float32 master whose low half is a remainder slot.
enum class VarForm : int32_t { plain = 0, master = 1, remainder = 2 };

struct PassTask {
  PassKind kind = PassKind::update;
  Convention rule = Convention::keras;
  MomentumKind momentum = MomentumKind::none;  // from the tensor's group
  size_t index = 0;                            // the variable's position in build order
  DType var_dtype = DType::float32;   // variables and gradients
  DType slot_dtype = DType::float32;  // momentum, average, accumulator
  int64_t numel = 0;
  void* w = nullptr;
  const void* g = nullptr;
  void* m = nullptr;    // momentum slot, or null
  void* avg = nullptr;  // EMA slot, or null
  void* acc = nullptr;  // accumulator slot, or null
  // Low-precision storage of a 16-bit variable on update passes (see math.h, "16-bit storage"):
  // `master` is its float32 master or its remainder slot (by `form`), `stochastic` rounds the
  // stored variable with the random stream in ts.random_stream.
  VarForm form = VarForm::plain;
  bool stochastic = false;
  void* master = nullptr;
  TensorScalars ts;
};

// Step-wide compile-time features of the passes (one kernel instantiation per combination,
// together with each task's rule and momentum kind).
struct PassFeatures {
  bool merge_window = false;
  bool norm_clip = false;
  bool ema = false;
  // Unscale or clip-by-value is active this step; when not, and for tasks without weight
  // decay, the CPU walk uses kernels that skip those identities (CUDA ignores both).
  bool grad_transforms = true;
};

enum class NormClip : int32_t { none = 0, per_tensor = 1, global = 2 };

// Sums of squares of the update tasks' effective gradients, in task order, and whether any
// element was Inf or NaN. Deterministic: fixed blocks, fixed summation order.
struct GradMeasure {
  std::vector<double> task_sums;
  double total = 0.0;
  bool nonfinite = false;
};

struct StepPlan {
  StepScalars scalars;
  PassFeatures features;
  NormClip norm_clip = NormClip::none;
  double clipnorm = 0.0;
  // A squared global norm computed outside (across ranks): global clipping uses it as is.
  bool external_global = false;
  // Some update task computes in float32: a global sum of squares beyond float32 is inf.
  bool narrow_global_norm = false;
  double global_sum_squares = 0.0;
  // measured.task_sums already holds this step's sums (the backend need not measure again).
  bool measured_valid = false;
  GradMeasure measured;
  std::vector<PassTask> tasks;
};

}  // namespace detail
}  // namespace fastsgd
