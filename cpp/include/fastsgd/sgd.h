// fastsgd::SGD — the one orchestrator. It follows keras.optimizers.SGD (Keras 3) step by step:
//   unscale (loss scale) -> accumulate, or go on -> norms (only for a norm clip)
//   -> one fused pass per tensor (clip, weight decay, momentum/Nesterov, EMA, overwrite)
//   -> iteration counter.
// It owns the slot buffers (momentum, EMA average, gradient accumulator) on the device of the
// variables, validates every input before its first write (a throwing step changes nothing),
// and exports / imports its state. Python's fastsgd.SGD wraps this class; C++ programs use it
// directly.
//
//   fastsgd::Options opt;  opt.momentum = 0.9;
//   fastsgd::SGD sgd(opt);
//   sgd.build({{w.data(), n, fastsgd::DType::float32}});
//   for (...) { compute grad; sgd.step({{w.data(), n}}, {{g.data(), n}}, 0.01); }
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fastsgd/step.h"
#include "fastsgd/tensor.h"

namespace fastsgd {

// Hyper-parameters. Zero (or a non-positive value) disables an optional feature, as in Keras.
struct Options {
  double momentum = 0.0;                  // in [0, 1]
  bool nesterov = false;                  // ignored when momentum == 0
  double weight_decay = 0.0;              // decoupled: w *= 1 - weight_decay * lr
  double clipnorm = 0.0;                  // per-tensor L2 clip
  double clipvalue = 0.0;                 // element clip into [-clipvalue, clipvalue]
  double global_clipnorm = 0.0;           // L2 clip over all gradients of a step
  bool use_ema = false;
  double ema_momentum = 0.99;             // in [0, 1]
  int64_t ema_overwrite_frequency = 0;    // every N steps copy the average into the variables
  double loss_scale_factor = 0.0;         // gradients are divided by it first
  int64_t gradient_accumulation_steps = 0;  // >= 2 enables accumulation
  // Slots of float16/bfloat16 variables are float32 unless this is set.
  bool slots_in_variable_dtype = false;
};

enum class SlotKind : int32_t { momentum = 0, average = 1, accumulator = 2 };

inline const char* slot_kind_name(SlotKind k) {
  return k == SlotKind::momentum ? "momentum" : (k == SlotKind::average ? "average" : "accumulator");
}

// Which CPU code path runs, and how many threads it may use.
struct CpuInfo {
  std::vector<std::string> available;  // ISA levels this CPU can run, lowest first
  std::string active;                  // the level in use
  int threads = 1;
};
CpuInfo cpu_info();

// Caps the CPU threads later steps use; 0 restores FASTSGD_NUM_THREADS or the CPU count.
// Results do not depend on it: the update is element-wise and norms use fixed blocks.
void set_num_threads(int threads);

// CUDA support: whether this build has CUDA kernels, and a human-readable device status.
struct CudaInfo {
  bool built = false;
  int device_count = 0;
  std::string status;
};
CudaInfo cuda_info();

class SGD {
 public:
  explicit SGD(const Options& options);
  ~SGD();
  SGD(const SGD&) = delete;
  SGD& operator=(const SGD&) = delete;

  const Options& options() const { return options_; }

  // Declares the variables (in order) and allocates their slots, zero-filled, on their device.
  // `decays[i] == false` excludes variable i from weight decay (empty: all decay).
  void build(const std::vector<TensorView>& variables, const std::vector<bool>& decays = {});
  bool built() const { return built_; }
  size_t num_variables() const { return vars_.size(); }
  const TensorView& variable_spec(size_t i) const { return vars_.at(i); }
  void set_decays(size_t i, bool decays);

  // One call of Keras's apply(). Both arrays hold num_variables() views in build order;
  // grads[i].data == nullptr means "no gradient for variable i this call". Variables without
  // a gradient may be empty views when nothing touches them (no EMA, no accumulator reset).
  // `learning_rate` is read only on update calls (see update_is_due()).
  // Throws TypeError / ValueError before writing anything.
  void step(const TensorView* variables, const TensorView* grads, double learning_rate);
  void step(const std::vector<TensorView>& variables, const std::vector<TensorView>& grads,
            double learning_rate);

  // True when the next step() updates variables (always, unless accumulating).
  bool update_is_due() const;
  // True when the next step() reads variables that have no gradient (EMA or a reset).
  bool next_step_touches_all() const;

  // Keras's `_iterations` (every call) and `iterations` (completed update steps).
  int64_t raw_iterations() const { return raw_iterations_; }
  int64_t iterations() const;
  void set_raw_iterations(int64_t value);

  // Slot buffers for state export / import and EMA finalisation; an empty view if absent.
  bool has_slot(SlotKind kind) const;
  TensorView slot(SlotKind kind, size_t i) const;

  // Copies a slot to or from host memory (slot(kind, i).nbytes() bytes), for checkpoints.
  void read_slot(SlotKind kind, size_t i, void* host_dst) const;
  void write_slot(SlotKind kind, size_t i, const void* host_src);

  // CUDA stream (a cudaStream_t as an integer) for later steps; 0 is the default stream.
  // Ignored for CPU variables.
  void set_stream(uintptr_t stream);

  // Copies every EMA average into its variable (Keras finalize_variable_values).
  void finalize_variable_values(const std::vector<TensorView>& variables);

  struct Impl;

 private:
  void validate(const TensorView* variables, const TensorView* grads, bool touches_all) const;

  Options options_;
  bool built_ = false;
  int64_t raw_iterations_ = 0;
  std::vector<TensorView> vars_;  // build-time specs (data pointers are not kept valid)
  std::vector<bool> decays_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fastsgd
