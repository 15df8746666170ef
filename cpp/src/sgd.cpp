// The engine: turns one Keras-style apply() into a validated step plan for a backend.
#include "fastsgd/sgd.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "backend.h"
#include "plan.h"

namespace fastsgd {

namespace {

std::string describe(const char* what, size_t i) { return std::string(what) + "[" + std::to_string(i) + "]"; }

bool usable_dtype(DType t) {
  return t == DType::float16 || t == DType::bfloat16 || t == DType::float32 || t == DType::float64;
}

DType slot_dtype_for(DType var, const Options& o) {
  if ((var == DType::float16 || var == DType::bfloat16) && !o.slots_in_variable_dtype)
    return DType::float32;
  return var;
}

struct Interval {
  uintptr_t begin, end;
  bool written;
  const char* what;
  size_t index;
};

// Throws when a written buffer overlaps any other buffer of the list (read-only buffers may
// overlap one another).
void check_overlaps(std::vector<Interval>& items) {
  std::sort(items.begin(), items.end(),
            [](const Interval& a, const Interval& b) { return a.begin < b.begin; });
  const Interval* last_any = nullptr;
  const Interval* last_written = nullptr;
  for (const Interval& it : items) {
    const Interval* prior = it.written ? last_any : last_written;
    if (prior && it.begin < prior->end) {
      throw ValueError(describe(prior->what, prior->index) + " and " + describe(it.what, it.index) +
                       " share memory; every variable needs its own buffer and gradients must "
                       "not alias variables");
    }
    if (!last_any || it.end > last_any->end) last_any = &it;
    if (it.written && (!last_written || it.end > last_written->end)) last_written = &it;
  }
}

}  // namespace

struct SGD::Impl {
  std::unique_ptr<detail::Backend> backend;
  Device device;
  std::vector<DType> slot_dtypes;
  std::vector<void*> slots[3];  // indexed by SlotKind
  detail::StepPlan plan;
  std::vector<Interval> intervals;
  // Data pointers of the last validated step: an identical step skips the overlap sort.
  std::vector<const void*> last_pointers, pointers;

  ~Impl() {
    for (auto& kind : slots)
      for (void* p : kind)
        if (p) backend->release(p);
  }
};

SGD::SGD(const Options& options) : options_(options) {
  const Options& o = options_;
  auto finite = [](double v) { return std::isfinite(v); };
  if (!(o.momentum >= 0.0 && o.momentum <= 1.0))
    throw ValueError("momentum must be a float in [0, 1], got " + std::to_string(o.momentum));
  if (!finite(o.weight_decay) || !finite(o.clipnorm) || !finite(o.clipvalue) ||
      !finite(o.global_clipnorm) || !finite(o.loss_scale_factor))
    throw ValueError("weight_decay, clipnorm, clipvalue, global_clipnorm and loss_scale_factor must be finite");
  const int clips = (o.clipnorm > 0) + (o.clipvalue > 0) + (o.global_clipnorm > 0);
  if (clips > 1) throw ValueError("only one of clipnorm, clipvalue and global_clipnorm can be set");
  if (o.gradient_accumulation_steps == 1 || o.gradient_accumulation_steps < 0)
    throw ValueError("gradient_accumulation_steps must be >= 2 (or 0 to disable)");
  if (o.use_ema && !(o.ema_momentum >= 0.0 && o.ema_momentum <= 1.0))
    throw ValueError("ema_momentum must be in [0, 1]");
  if (o.ema_overwrite_frequency < 0) throw ValueError("ema_overwrite_frequency must be >= 0");
  if (o.loss_scale_factor < 0) throw ValueError("loss_scale_factor must be positive");
}

SGD::~SGD() = default;

void SGD::build(const std::vector<TensorView>& variables, const std::vector<bool>& decays) {
  if (built_) throw ValueError("the optimizer is already built");
  if (!decays.empty() && decays.size() != variables.size())
    throw ValueError("decays must have one entry per variable");
  Device device = variables.empty() ? Device{} : variables[0].device;
  std::vector<Interval> intervals;
  for (size_t i = 0; i < variables.size(); ++i) {
    const TensorView& v = variables[i];
    if (!usable_dtype(v.dtype)) throw TypeError(describe("variables", i) + " has an unsupported dtype");
    if (v.numel < 0) throw ValueError(describe("variables", i) + " has a negative size");
    if (v.numel > 0 && !v.data) throw ValueError(describe("variables", i) + " has no data");
    if (v.device != device)
      throw ValueError(describe("variables", i) + " is on " + device_name(v.device) +
                       " but variables[0] is on " + device_name(device) +
                       "; one optimizer updates variables on one device");
    if (v.numel > 0) {
      const auto b = reinterpret_cast<uintptr_t>(v.data);
      intervals.push_back({b, b + uintptr_t(v.nbytes()), true, "variables", i});
    }
  }
  check_overlaps(intervals);

  auto impl = std::make_unique<Impl>();
  impl->device = device;
  impl->backend = device.kind == DeviceKind::cpu ? detail::make_cpu_backend()
                                                 : detail::make_cuda_backend(device.index);
  const bool want[3] = {options_.momentum != 0.0, options_.use_ema,
                        options_.gradient_accumulation_steps >= 2};
  for (size_t i = 0; i < variables.size(); ++i) {
    const DType sd = slot_dtype_for(variables[i].dtype, options_);
    impl->slot_dtypes.push_back(sd);
    for (int k = 0; k < 3; ++k) {
      impl->slots[k].push_back(
          want[k] ? impl->backend->allocate_zeroed(variables[i].numel * dtype_size(sd)) : nullptr);
    }
  }
  impl->plan.tasks.reserve(variables.size());
  impl->intervals.reserve(2 * variables.size());
  vars_ = variables;
  for (auto& v : vars_) v.data = nullptr;
  decays_ = decays.empty() ? std::vector<bool>(variables.size(), true) : decays;
  impl_ = std::move(impl);
  built_ = true;
}

void SGD::set_decays(size_t i, bool decays) { decays_.at(i) = decays; }

bool SGD::update_is_due() const {
  const int64_t k = options_.gradient_accumulation_steps;
  return k < 2 || (raw_iterations_ + 1) % k == 0;
}

bool SGD::next_step_touches_all() const {
  return options_.use_ema || (options_.gradient_accumulation_steps >= 2 && update_is_due());
}

int64_t SGD::iterations() const {
  const int64_t k = options_.gradient_accumulation_steps;
  return k >= 2 ? raw_iterations_ / k : raw_iterations_;
}

void SGD::set_raw_iterations(int64_t value) {
  if (value < 0) throw ValueError("iterations must be >= 0");
  raw_iterations_ = value;
}

bool SGD::has_slot(SlotKind kind) const {
  return built_ && !impl_->slots[int(kind)].empty() && impl_->slots[int(kind)][0] != nullptr;
}

TensorView SGD::slot(SlotKind kind, size_t i) const {
  if (!built_ || i >= vars_.size()) throw ValueError("no such slot");
  TensorView v;
  v.data = impl_->slots[int(kind)][i];
  v.numel = v.data ? vars_[i].numel : 0;
  v.dtype = impl_->slot_dtypes[i];
  v.device = impl_->device;
  return v;
}

void SGD::read_slot(SlotKind kind, size_t i, void* host_dst) const {
  const TensorView v = slot(kind, i);
  if (!v.data) throw ValueError(std::string("this optimizer has no ") + slot_kind_name(kind) + " slots");
  impl_->backend->copy_to_host(host_dst, v.data, v.nbytes());
}

void SGD::write_slot(SlotKind kind, size_t i, const void* host_src) {
  const TensorView v = slot(kind, i);
  if (!v.data) throw ValueError(std::string("this optimizer has no ") + slot_kind_name(kind) + " slots");
  impl_->backend->copy_from_host(v.data, host_src, v.nbytes());
}

void SGD::set_stream(uintptr_t stream) {
  if (built_) impl_->backend->set_stream(stream);
}

void SGD::validate(const TensorView* variables, const TensorView* grads, bool touches_all) const {
  const size_t n = vars_.size();
  bool any = false;
  auto same_kind = [&](const TensorView& t, size_t i, const char* what) {
    const TensorView& spec = vars_[i];
    if (t.dtype != spec.dtype)
      throw TypeError(describe(what, i) + " has dtype " + dtype_name(t.dtype) + ", expected " +
                      dtype_name(spec.dtype) + " (the dtype of the variable)");
    if (t.numel != spec.numel)
      throw ValueError(describe(what, i) + " has " + std::to_string(t.numel) +
                       " elements, expected " + std::to_string(spec.numel));
    if (t.device != impl_->device)
      throw ValueError(describe(what, i) + " is on " + device_name(t.device) + ", expected " +
                       device_name(impl_->device));
    if (t.numel > 0 && !t.data) throw ValueError(describe(what, i) + " has no data");
  };
  for (size_t i = 0; i < n; ++i) {
    const bool has_grad = grads[i].data != nullptr;
    if (has_grad) {
      any = true;
      same_kind(grads[i], i, "grads");
    }
    if (has_grad || touches_all) same_kind(variables[i], i, "variables");
  }
  if (!any) throw ValueError("No gradients provided for any variable.");
}

void SGD::step(const std::vector<TensorView>& variables, const std::vector<TensorView>& grads,
               double learning_rate) {
  if (variables.size() != vars_.size() || grads.size() != vars_.size())
    throw ValueError("step() needs one variable view and one gradient view per built variable (" +
                     std::to_string(vars_.size()) + ")");
  step(variables.data(), grads.data(), learning_rate);
}

void SGD::step(const TensorView* variables, const TensorView* grads, double learning_rate) {
  if (!built_) throw ValueError("build() the optimizer before step()");
  const Options& o = options_;
  const bool accumulating = o.gradient_accumulation_steps >= 2;
  const bool update_call = update_is_due();
  const bool touches_all = next_step_touches_all();
  const size_t n = vars_.size();
  validate(variables, grads, touches_all);

  Impl& im = *impl_;
  // Overlap check, skipped when the buffers are exactly those of the last validated step.
  im.pointers.clear();
  for (size_t i = 0; i < n; ++i) {
    im.pointers.push_back(variables[i].data);
    im.pointers.push_back(grads[i].data);
  }
  if (im.pointers != im.last_pointers) {
    im.intervals.clear();
    for (size_t i = 0; i < n; ++i) {
      if (vars_[i].numel == 0) continue;
      if (variables[i].data) {
        const auto b = reinterpret_cast<uintptr_t>(variables[i].data);
        im.intervals.push_back({b, b + uintptr_t(vars_[i].nbytes()), true, "variables", i});
      }
      if (grads[i].data) {
        const auto b = reinterpret_cast<uintptr_t>(grads[i].data);
        im.intervals.push_back({b, b + uintptr_t(vars_[i].nbytes()), false, "grads", i});
      }
    }
    check_overlaps(im.intervals);
    im.last_pointers.swap(im.pointers);
  }

  detail::StepPlan& plan = im.plan;
  StepScalars& s = plan.scalars;
  s = StepScalars{};
  s.learning_rate = update_call ? learning_rate : 0.0;
  s.momentum = o.momentum;
  s.grad_scale = o.loss_scale_factor > 0 ? 1.0 / o.loss_scale_factor : 1.0;
  s.window = (accumulating && update_call) ? double(o.gradient_accumulation_steps) : 1.0;
  s.weight_decay = o.weight_decay;
  s.clip_value = o.clipvalue;
  const int64_t public_iterations = iterations();
  s.ema_keep = (o.use_ema && public_iterations != 0) ? o.ema_momentum : 0.0;
  s.merge_window = accumulating && update_call;
  s.reset_accumulator = accumulating && update_call;
  s.ema_overwrite = o.use_ema && o.ema_overwrite_frequency > 0 &&
                    (public_iterations + 1) % o.ema_overwrite_frequency == 0;

  plan.features.momentum = o.momentum == 0.0 ? MomentumKind::none
                           : o.nesterov      ? MomentumKind::nesterov
                                             : MomentumKind::heavy_ball;
  plan.features.merge_window = s.merge_window;
  plan.features.ema = o.use_ema;
  plan.features.grad_transforms = s.grad_scale != 1.0 || s.clip_value > 0;
  plan.norm_clip = !update_call              ? detail::NormClip::none
                   : o.clipnorm > 0          ? detail::NormClip::per_tensor
                   : o.global_clipnorm > 0   ? detail::NormClip::global
                                             : detail::NormClip::none;
  plan.clipnorm = o.clipnorm > 0 ? o.clipnorm : o.global_clipnorm;
  plan.features.norm_clip = plan.norm_clip != detail::NormClip::none;

  plan.tasks.clear();
  for (size_t i = 0; i < n; ++i) {
    detail::PassTask t;
    if (grads[i].data) {
      t.kind = update_call ? PassKind::update : PassKind::accumulate;
    } else if (touches_all) {
      t.kind = PassKind::idle;
    } else {
      continue;
    }
    t.var_dtype = vars_[i].dtype;
    t.slot_dtype = im.slot_dtypes[i];
    t.numel = vars_[i].numel;
    t.w = variables[i].data;
    t.g = grads[i].data;
    t.m = im.slots[int(SlotKind::momentum)][i];
    t.avg = im.slots[int(SlotKind::average)][i];
    t.acc = im.slots[int(SlotKind::accumulator)][i];
    t.ts.decays = decays_[i] && o.weight_decay != 0.0;
    if (t.numel > 0) plan.tasks.push_back(t);
  }
  im.backend->execute(plan);
  ++raw_iterations_;
}

void SGD::finalize_variable_values(const std::vector<TensorView>& variables) {
  if (!options_.use_ema || !built_) return;
  if (variables.size() != vars_.size())
    throw ValueError("finalize_variable_values() got " + std::to_string(variables.size()) +
                     " variables, but the optimizer holds " + std::to_string(vars_.size()) +
                     " averages");
  for (size_t i = 0; i < variables.size(); ++i) {
    const TensorView& spec = vars_[i];
    const TensorView& v = variables[i];
    if (v.dtype != spec.dtype || v.numel != spec.numel || v.device != impl_->device ||
        (v.numel > 0 && !v.data))
      throw ValueError(describe("variables", i) + " does not match the variable built at that position");
  }
  detail::StepPlan& plan = impl_->plan;
  plan.scalars = StepScalars{};
  plan.features = detail::PassFeatures{};
  plan.norm_clip = detail::NormClip::none;
  plan.tasks.clear();
  for (size_t i = 0; i < variables.size(); ++i) {
    detail::PassTask t;
    t.kind = PassKind::finalize;
    t.var_dtype = vars_[i].dtype;
    t.slot_dtype = impl_->slot_dtypes[i];
    t.numel = vars_[i].numel;
    t.w = variables[i].data;
    t.avg = impl_->slots[int(SlotKind::average)][i];
    if (t.numel > 0) plan.tasks.push_back(t);
  }
  impl_->backend->execute(plan);
}

}  // namespace fastsgd
