// The scalars of one optimizer step, shared by the CPU walks and the CUDA kernels.
// The engine fills StepScalars once per call and TensorScalars once per tensor (in double);
// math.h turns them into the coefficients of the compute type, so both backends round the
// same way.
#pragma once

#include <cstdint>

namespace fastsgd {

// What one fused pass does to a tensor.
enum class PassKind : int32_t {
  update = 0,      // has a gradient on an update call: the full SGD step
  accumulate = 1,  // has a gradient on a non-update accumulation call: acc += g
  idle = 2,        // no gradient this call: only EMA / overwrite / accumulator reset
  finalize = 3,    // copy the EMA average into the variable (finalize_variable_values)
};

enum class MomentumKind : int32_t { none = 0, heavy_ball = 1, nesterov = 2 };

// Which per-element rule a pass follows (see math.h):
//   keras  v = m*v - lr*g ; w += v                      (keras.optimizers.SGD)
//   torch  b = m*b + (1 - dampening)*g ; w -= lr*b      (torch.optim.SGD, its roundings)
enum class Convention : int32_t { keras = 0, torch = 1 };

// How weight decay enters: decoupled (w *= 1 - wd*lr, Keras) or L2 (g += wd*w, torch).
enum class DecayForm : int32_t { decoupled = 0, l2 = 1 };

// Where the exact value of a float16/bfloat16 variable lives between steps (Options::master_weights):
//   float32    a float32 master slot; the variable is its rounded copy
//   remainder  (bfloat16 only) a 16-bit slot with the low half of the float32 master's bits; the
//              variable holds the high half (rounded), and the pair is the master exactly
enum class MasterForm : int32_t { float32 = 0, remainder = 1 };

// Step-wide scalars: the same for every tensor of a call.
struct StepScalars {
  double grad_scale = 1.0;      // 1 / loss_scale_factor, times the call's own unscale factor
  double window = 1.0;          // gradient_accumulation_steps on an update call, else 1
  double clip_value = 0.0;      // > 0 enables clipping into [-clip_value, clip_value]
  double ema_keep = 0.0;        // weight of the old average (0 on the first step)
  bool merge_window = false;    // update call under accumulation: g = (g + acc) / window
  bool reset_accumulator = false;
  bool ema_overwrite = false;   // copy the average into the variable after the EMA update
};

// Per-tensor scalars: the tensor's group hyper-parameters and its norm-clip coefficients.
struct TensorScalars {
  double clip_mul = 1.0;        // norm clip: g = (g * clip_mul) / clip_div
  double clip_div = 1.0;
  double learning_rate = 0.0;
  double momentum = 0.0;
  double dampening = 0.0;       // torch convention: b = m*b + (1 - dampening)*g
  double weight_decay = 0.0;    // 0 for variables excluded from weight decay
  bool decay_l2 = false;        // DecayForm::l2
  bool maximize = false;        // g = -g before decay and momentum
  bool fresh_momentum = false;  // torch convention: the momentum slot starts now (b = g)
  // Stochastic rounding: the key of this tensor's random stream (math::random_stream).
  uint64_t random_stream = 0;
};

}  // namespace fastsgd
