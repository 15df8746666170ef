// fastsgd::SGD — the one orchestrator. It follows keras.optimizers.SGD (Keras 3) step by step:
//   unscale (loss scale, grad_scale) -> accumulate, or go on -> norms (norm clip, overflow
//   check) -> one fused pass per tensor (clip, maximize, weight decay, momentum/Nesterov, EMA,
//   overwrite) -> iteration counter.
// Every variable belongs to a parameter group (learning rate, momentum, dampening, Nesterov,
// weight decay and its form, maximize); the per-element rule is Keras's or torch's
// (Options::convention). Slots (momentum, EMA average, gradient accumulator) are owned by the
// engine, on the device of the variables, or by the caller (Options::caller_owned_slots: a
// framework's own tensors, passed to every step). Every input is validated before the first
// write (a throwing step changes nothing); a step skipped for non-finite gradients changes
// nothing either and is counted apart. Norms can be measured (grad_stats) and supplied
// (StepRequest::global_sum_squares) across processes. Python's fastsgd.SGD and the framework
// adapters wrap this class; C++ programs use it directly.
//
//   fastsgd::Options opt;  opt.group.momentum = 0.9;
//   fastsgd::SGD sgd(opt);
//   sgd.build({{w.data(), n, fastsgd::DType::float32}});
//   for (...) { compute grad; sgd.step({{w.data(), n}}, {{g.data(), n}}, 0.01); }
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fastsgd/step.h"
#include "fastsgd/tensor.h"

namespace fastsgd {

// One parameter group's hyper-parameters. Every variable belongs to one group; groups may
// change between steps (set_group), as torch's schedulers rewrite param_groups.
struct Group {
  double learning_rate = 0.01;            // a step may override it for every group
  double momentum = 0.0;                  // in [0, 1] (keras), >= 0 (torch)
  double dampening = 0.0;                 // torch convention only
  bool nesterov = false;
  double weight_decay = 0.0;              // >= 0; 0 disables
  std::optional<DecayForm> decay_form;    // unset: decoupled under keras, l2 under torch
  bool maximize = false;                  // ascend instead of descend: g = -g

  // Every field once, for bindings and serialisers: f(name, member pointer, description).
  template <class F>
  static void fields(F&& f) {
    f("learning_rate", &Group::learning_rate, "step size (a step's learning_rate may override it)");
    f("momentum", &Group::momentum, "momentum factor");
    f("dampening", &Group::dampening, "torch convention: b = m*b + (1 - dampening)*g");
    f("nesterov", &Group::nesterov, "Nesterov momentum");
    f("weight_decay", &Group::weight_decay, "weight decay factor (0 disables)");
    f("decay_form", &Group::decay_form, "DecayForm.decoupled or DecayForm.l2; None: the convention's own");
    f("maximize", &Group::maximize, "ascend the objective (g = -g)");
  }
};

// Hyper-parameters. Zero (or a non-positive value) disables an optional feature, as in Keras.
struct Options {
  Convention convention = Convention::keras;
  Group group;                            // group 0
  // Optional values follow Keras's None: unset is off. At most one clip may be set; a set
  // clip <= 0 clips nothing.
  std::optional<double> clipnorm;         // per-tensor L2 clip
  std::optional<double> clipvalue;        // element clip into [-clipvalue, clipvalue]
  std::optional<double> global_clipnorm;  // L2 clip over all gradients of a step
  bool use_ema = false;
  double ema_momentum = 0.99;             // in [0, 1]
  std::optional<int64_t> ema_overwrite_frequency;   // every N steps copy the average into the variables
  std::optional<double> loss_scale_factor;          // gradients are divided by it first
  std::optional<int64_t> gradient_accumulation_steps;  // >= 2 enables accumulation (0: off)
  // Slots of float16/bfloat16 variables are float32 unless this is set.
  bool slots_in_variable_dtype = false;
  // The caller owns every slot buffer and passes them to each step (StepRequest::slots);
  // the engine allocates none.
  bool caller_owned_slots = false;
  // A step whose effective gradients hold an Inf or NaN changes nothing (see StepResult).
  bool skip_nonfinite = false;
  // float16/bfloat16 variables only (others are unaffected): keep the exact value in a float32
  // master slot, or (bfloat16) in a 16-bit remainder slot beside the variable; the update runs
  // on the master and stores the rounded variable in the same pass. Not with use_ema.
  std::optional<MasterForm> master_weights;
  // float16/bfloat16 variables only: update passes round the stored variable stochastically,
  // with random bits from (seed, step, variable index, element index): the same bits on every
  // ISA level, thread count and device, and after a resume.
  bool stochastic_rounding = false;
  uint64_t seed = 0;

  // Every field once, for bindings and serialisers: f(name, member pointer, description).
  template <class F>
  static void fields(F&& f) {
    f("convention", &Options::convention, "Convention.keras or Convention.torch");
    f("group", &Options::group, "group 0's hyper-parameters");
    f("clipnorm", &Options::clipnorm, "per-tensor L2 clip, or None");
    f("clipvalue", &Options::clipvalue, "element clip into [-clipvalue, clipvalue], or None");
    f("global_clipnorm", &Options::global_clipnorm, "L2 clip over all gradients of a step, or None");
    f("use_ema", &Options::use_ema, "keep an exponential moving average of the variables");
    f("ema_momentum", &Options::ema_momentum, "the average's momentum, in [0, 1]");
    f("ema_overwrite_frequency", &Options::ema_overwrite_frequency, "copy averages into variables every N steps");
    f("loss_scale_factor", &Options::loss_scale_factor, "gradients are divided by it first, or None");
    f("gradient_accumulation_steps", &Options::gradient_accumulation_steps, "update every N calls (N >= 2)");
    f("slots_in_variable_dtype", &Options::slots_in_variable_dtype, "16-bit variables keep 16-bit slots");
    f("caller_owned_slots", &Options::caller_owned_slots, "every step passes the slots; the engine owns none");
    f("skip_nonfinite", &Options::skip_nonfinite, "a step with Inf/NaN gradients changes nothing");
    f("master_weights", &Options::master_weights, "MasterForm.float32, MasterForm.remainder or None (16-bit variables)");
    f("stochastic_rounding", &Options::stochastic_rounding, "round stored 16-bit variables stochastically");
    f("seed", &Options::seed, "key of the stochastic rounding stream");
  }
};

// Throws ValueError (Keras's or torch's wording) for a value out of range.
void validate(const Options& options);
void validate(const Group& group, Convention convention);

// master: float32 copy of a 16-bit variable; remainder: the low 16 bits of a bfloat16 variable's
// float32 master, held in a 16-bit (bfloat16-typed) buffer as raw bits.
enum class SlotKind : int32_t { momentum = 0, average = 1, accumulator = 2, master = 3, remainder = 4 };
constexpr int kNumSlotKinds = 5;

inline const char* slot_kind_name(SlotKind k) {
  switch (k) {
    case SlotKind::momentum: return "momentum";
    case SlotKind::average: return "average";
    case SlotKind::accumulator: return "accumulator";
    case SlotKind::master: return "master";
    case SlotKind::remainder: return "remainder";
  }
  return "unknown";
}

// Everything one step reads. Arrays hold num_variables() entries in build order.
struct StepRequest {
  const TensorView* variables = nullptr;
  const TensorView* grads = nullptr;      // data == nullptr: no gradient for that variable
  // Caller-owned slots (Options::caller_owned_slots), one array per SlotKind; an entry with
  // data == nullptr is a slot the step does not need.
  const TensorView* slots[kNumSlotKinds] = {};
  // torch convention, caller-owned slots: nonzero where the momentum slot starts this step.
  const uint8_t* fresh_momentum = nullptr;
  // Unset: each group's own learning rate; set: the rate of every group for this step.
  std::optional<double> learning_rate;
  double grad_scale = 1.0;                // multiplies every gradient (e.g. 1 / GradScaler scale)
  // Unset: decided here (Options::skip_nonfinite); set: decided outside (true skips the step).
  std::optional<bool> found_inf;
  // Unset: measured here; set: the squared global norm over all ranks, for global_clipnorm
  // (and, unless found_inf is set, for the non-finite check).
  std::optional<double> global_sum_squares;
  // CUDA: the stream (a cudaStream_t as an integer) to launch on, and one whose pending work
  // must finish first; applied only once the step is validated. Unset: as the last step.
  std::optional<uintptr_t> stream;
  std::optional<uintptr_t> wait_for_stream;
};

struct StepResult {
  bool updated = false;   // variables took an update step
  bool skipped = false;   // non-finite gradients or found_inf: nothing changed
};

// What norm clipping measures: per variable (0 without a gradient) and in total.
struct GradStats {
  std::vector<double> sum_squares;
  double total = 0.0;
  bool nonfinite = false;
};

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

  // Parameter groups: group 0 comes from Options::group. Validated; effective next step.
  size_t add_group(const Group& group);
  void set_group(size_t index, const Group& group);
  const Group& group(size_t index) const;
  size_t num_groups() const { return groups_.size(); }

  // Declares the variables (in order) and allocates their slots, zero-filled, on their device
  // (none with caller-owned slots); a float32 master starts as a copy of its variable, a
  // remainder as zeros (the variable is then its master exactly). `decays[i] == false` excludes variable i from weight decay,
  // `groups[i]` is its group (empty: all decay, all in group 0).
  void build(const std::vector<TensorView>& variables, const std::vector<bool>& decays = {},
             const std::vector<size_t>& groups = {});
  bool built() const { return built_; }
  size_t num_variables() const { return vars_.size(); }
  const TensorView& variable_spec(size_t i) const { return vars_.at(i); }
  size_t group_of(size_t i) const { return group_of_.at(i); }
  void set_decays(size_t i, bool decays);

  // One call of Keras's apply() / torch's step(). Variables without a gradient may be empty
  // views when nothing touches them (no EMA, no accumulator reset). Throws TypeError /
  // ValueError before writing anything; a skipped step writes nothing and counts in
  // skipped_steps() only.
  StepResult step(const StepRequest& request);
  // Convenience: engine-owned slots, one learning rate for every group.
  StepResult step(const std::vector<TensorView>& variables, const std::vector<TensorView>& grads,
                  double learning_rate);

  // What the next step would measure (norm clipping, the non-finite check); changes nothing.
  GradStats grad_stats(const StepRequest& request);

  // True when the next step() updates variables (always, unless accumulating).
  bool update_is_due() const;
  // True when the next step() reads variables that have no gradient (EMA or a reset).
  bool next_step_touches_all() const;

  // Keras's `_iterations` (every call) and `iterations` (completed update steps); steps
  // skipped for non-finite gradients count only in skipped_steps().
  int64_t raw_iterations() const { return raw_iterations_; }
  int64_t iterations() const;
  void set_raw_iterations(int64_t value);
  int64_t skipped_steps() const { return skipped_steps_; }
  void set_skipped_steps(int64_t value);
  // The stochastic rounding seed (Options::seed), part of the state a checkpoint restores.
  uint64_t seed() const { return options_.seed; }
  void set_seed(uint64_t seed) { options_.seed = seed; }

  // Engine-owned slot buffers for state export / import and EMA finalisation; an empty view
  // if absent.
  bool has_slot(SlotKind kind) const;
  TensorView slot(SlotKind kind, size_t i) const;
  // torch convention, engine-owned slots: whether variable i's momentum has had its first step.
  bool momentum_started(size_t i) const;
  void set_momentum_started(size_t i, bool started);

  // Copies a slot to or from host memory (slot(kind, i).nbytes() bytes), for checkpoints.
  void read_slot(SlotKind kind, size_t i, void* host_dst) const;
  void write_slot(SlotKind kind, size_t i, const void* host_src);

  // CUDA stream (a cudaStream_t as an integer) for later steps; 0 is the default stream.
  // Ignored for CPU variables.
  void set_stream(uintptr_t stream);
  // The next step's launches also wait for the work queued so far on `producer_stream` (the
  // stream that produced the gradients, when the step runs on another one). Ignored for CPU
  // variables.
  void wait_for_stream(uintptr_t producer_stream);

  // Copies every EMA average into its variable (Keras finalize_variable_values).
  void finalize_variable_values(const std::vector<TensorView>& variables);

  struct Impl;

 private:
  // `measuring`: only what grad_stats reads (gradients and accumulators) must be there.
  void validate_request(const StepRequest& r, bool touches_all, bool update_call, bool measuring = false) const;
  void plan_step(const StepRequest& r, bool update_call, bool touches_all);
  void apply_streams(const StepRequest& r);
  bool wants_slot(SlotKind kind, size_t i) const;
  DType slot_dtype(SlotKind kind, size_t i) const;

  Options options_;
  std::vector<Group> groups_;
  bool built_ = false;
  int64_t raw_iterations_ = 0;
  int64_t skipped_steps_ = 0;
  std::vector<TensorView> vars_;  // build-time specs (data pointers are not kept valid)
  std::vector<bool> decays_;
  std::vector<size_t> group_of_;
  std::vector<uint8_t> momentum_started_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fastsgd
