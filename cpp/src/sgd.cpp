// The engine: validates hyper-parameters and requests, and turns one step into a plan for a
// backend. Every refusal happens here, before the first write.
#include "fastsgd/sgd.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string>

#include "backend.h"
#include "fastsgd/math.h"
#include "plan.h"

namespace fastsgd {

namespace {

std::string describe(const char* what, size_t i) { return std::string(what) + "[" + std::to_string(i) + "]"; }

// A double as Python's repr writes it: the shortest round-trip digits, positional for
// decimal exponents in [-4, 16), else scientific with a two-digit exponent ("1e-05").
std::string repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);  // [-]d[.ddd]e(+|-)xx
  const size_t e = sci.find('e');
  const bool negative = sci[0] == '-';
  std::string digits;
  for (size_t i = negative ? 1 : 0; i < e; ++i)
    if (sci[i] != '.') digits += sci[i];
  const int exponent = std::stoi(sci.substr(e + 1));
  std::string out = negative ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    const int a = exponent < 0 ? -exponent : exponent;
    return out + (exponent < 0 ? "e-" : "e+") + (a < 10 ? "0" : "") + std::to_string(a);
  }
  if (exponent < 0) return out + "0." + std::string(size_t(-exponent - 1), '0') + digits;
  if (digits.size() <= size_t(exponent) + 1) return out + digits + std::string(size_t(exponent) + 1 - digits.size(), '0') + ".0";
  return out + digits.substr(0, size_t(exponent) + 1) + "." + digits.substr(size_t(exponent) + 1);
}
std::string repr(const std::optional<double>& v) { return v ? repr(*v) : "None"; }
std::string repr(const std::optional<int64_t>& v) { return v ? std::to_string(*v) : "None"; }

bool usable_dtype(DType t) {
  return t == DType::float16 || t == DType::bfloat16 || t == DType::float32 || t == DType::float64;
}

DType slot_dtype_for(DType var, const Options& o) {
  if ((var == DType::float16 || var == DType::bfloat16) && !o.slots_in_variable_dtype)
    return DType::float32;
  return var;
}

bool is_16bit(DType t) { return t == DType::float16 || t == DType::bfloat16; }

// The slot that holds a variable's exact value under Options::master_weights, if any.
std::optional<SlotKind> master_slot_for(DType var, const Options& o) {
  if (!o.master_weights || !is_16bit(var)) return std::nullopt;
  return *o.master_weights == MasterForm::remainder ? SlotKind::remainder : SlotKind::master;
}

DecayForm decay_form_of(const Group& g, Convention c) {
  if (g.decay_form) return *g.decay_form;
  return c == Convention::torch ? DecayForm::l2 : DecayForm::decoupled;
}

double positive_or_zero(const std::optional<double>& v) { return v && *v > 0 ? *v : 0.0; }

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
                       " share memory; every variable and slot needs its own buffer and gradients must "
                       "not alias them");
    }
    if (!last_any || it.end > last_any->end) last_any = &it;
    if (it.written && (!last_written || it.end > last_written->end)) last_written = &it;
  }
}

const char* const kSlotArgs[kNumSlotKinds] = {"slots[momentum]", "slots[average]", "slots[accumulator]",
                                              "slots[master]", "slots[remainder]"};

}  // namespace

void validate(const Group& g, Convention c) {
  auto finite = [](const char* name, double v) {
    if (!std::isfinite(v))
      throw ValueError(std::string("`") + name + "` must be a finite float. Received: " + name + "=" + repr(v));
  };
  if (c == Convention::keras) {
    if (!(g.momentum >= 0.0 && g.momentum <= 1.0))
      throw ValueError("`momentum` must be a float between [0, 1].");
    if (g.dampening != 0.0)
      throw ValueError("`dampening` is a torch-convention hyper-parameter and must be 0 under the keras "
                       "convention. Received: dampening=" + repr(g.dampening));
  } else {
    if (!(g.learning_rate >= 0.0)) throw ValueError("Invalid learning rate: " + repr(g.learning_rate));
    if (!(g.momentum >= 0.0)) throw ValueError("Invalid momentum value: " + repr(g.momentum));
    if (!(g.weight_decay >= 0.0)) throw ValueError("Invalid weight_decay value: " + repr(g.weight_decay));
    if (g.nesterov && (g.momentum <= 0.0 || g.dampening != 0.0))
      throw ValueError("Nesterov momentum requires a momentum and zero dampening");
  }
  finite("learning_rate", g.learning_rate);
  finite("momentum", g.momentum);
  finite("dampening", g.dampening);
  finite("weight_decay", g.weight_decay);
  if (g.decay_form && *g.decay_form != DecayForm::decoupled && *g.decay_form != DecayForm::l2)
    throw ValueError("`decay_form` must be DecayForm.decoupled, DecayForm.l2 or None");
}

void validate(const Options& o) {
  if (o.convention != Convention::keras && o.convention != Convention::torch)
    throw ValueError("`convention` must be Convention.keras or Convention.torch");
  validate(o.group, o.convention);
  if (int(o.clipnorm.has_value()) + int(o.clipvalue.has_value()) + int(o.global_clipnorm.has_value()) > 1)
    throw ValueError("Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: clipnorm=" +
                     repr(o.clipnorm) + ", clipvalue=" + repr(o.clipvalue) +
                     ", global_clipnorm=" + repr(o.global_clipnorm));
  auto finite_or_none = [](const char* name, const std::optional<double>& v) {
    if (v && !std::isfinite(*v))
      throw ValueError(std::string("`") + name + "` must be a finite float or None. Received: " + name + "=" +
                       repr(v));
  };
  finite_or_none("clipnorm", o.clipnorm);
  finite_or_none("clipvalue", o.clipvalue);
  finite_or_none("global_clipnorm", o.global_clipnorm);
  finite_or_none("loss_scale_factor", o.loss_scale_factor);
  if (o.convention == Convention::keras) {
    // Keras keeps thresholds in float32: beyond its range every clipped step would be NaN.
    auto float32_or_none = [](const char* name, const std::optional<double>& v) {
      if (v && std::fabs(*v) > double(std::numeric_limits<float>::max()))
        throw ValueError(std::string("`") + name + "` must fit in float32 (at most 3.4028235e+38), as Keras keeps "
                         "it in float32. Received: " + name + "=" + repr(v));
    };
    float32_or_none("clipnorm", o.clipnorm);
    float32_or_none("clipvalue", o.clipvalue);
    float32_or_none("global_clipnorm", o.global_clipnorm);
  }
  if (o.loss_scale_factor && !(*o.loss_scale_factor > 0))
    throw ValueError("`loss_scale_factor` must be a positive float or None. Received: loss_scale_factor=" +
                     repr(o.loss_scale_factor));
  if (o.gradient_accumulation_steps && *o.gradient_accumulation_steps != 0 && *o.gradient_accumulation_steps < 2)
    throw ValueError("`gradient_accumulation_steps` must be an integer >= 2. Received: gradient_accumulation_steps=" +
                     repr(o.gradient_accumulation_steps));
  if (o.master_weights && *o.master_weights != MasterForm::float32 && *o.master_weights != MasterForm::remainder)
    throw ValueError("`master_weights` must be MasterForm.float32, MasterForm.remainder or None");
  if ((o.master_weights || o.stochastic_rounding) && o.use_ema)
    throw ValueError(o.master_weights
                         ? "`master_weights` cannot be combined with `use_ema` (the moving average would bypass "
                           "the master copy); Received: use_ema=True"
                         : "`stochastic_rounding` cannot be combined with `use_ema` (the moving average would "
                           "bypass the rounding); Received: use_ema=True");
  if (o.master_weights && o.slots_in_variable_dtype)
    throw ValueError("`master_weights` keeps a float32 master, so the other slots are float32 too; it cannot be "
                     "combined with slots in the variables' dtype (slot_dtype='variable', "
                     "Options.slots_in_variable_dtype)");
  if (o.use_ema) {
    if (!(o.ema_momentum >= 0.0 && o.ema_momentum <= 1.0))
      throw ValueError("`ema_momentum` must be in the range [0, 1]. Received: ema_momentum=" + repr(o.ema_momentum));
    if (o.ema_overwrite_frequency && *o.ema_overwrite_frequency != 0 && *o.ema_overwrite_frequency < 1)
      throw ValueError("`ema_overwrite_frequency` must be an integer >= 1 or None. Received: ema_overwrite_frequency=" +
                       repr(o.ema_overwrite_frequency));
  }
}

struct SGD::Impl {
  std::unique_ptr<detail::Backend> backend;
  Device device;
  std::vector<DType> slot_dtypes;
  std::vector<void*> slots[kNumSlotKinds];  // engine-owned, indexed by SlotKind
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
  validate(options_);
  groups_.push_back(options_.group);
}

SGD::~SGD() = default;

size_t SGD::add_group(const Group& group) {
  validate(group, options_.convention);
  groups_.push_back(group);
  return groups_.size() - 1;
}

void SGD::set_group(size_t index, const Group& group) {
  if (index >= groups_.size())
    throw ValueError("group index " + std::to_string(index) + " is out of range (" +
                     std::to_string(groups_.size()) + " groups)");
  validate(group, options_.convention);
  groups_[index] = group;
}

const Group& SGD::group(size_t index) const {
  if (index >= groups_.size())
    throw ValueError("group index " + std::to_string(index) + " is out of range (" +
                     std::to_string(groups_.size()) + " groups)");
  return groups_[index];
}

DType SGD::slot_dtype(SlotKind kind, size_t i) const {
  if (kind == SlotKind::master) return DType::float32;
  if (kind == SlotKind::remainder) return DType::bfloat16;  // raw 16-bit container
  return impl_->slot_dtypes[i];
}

bool SGD::wants_slot(SlotKind kind, size_t i) const {
  switch (kind) {
    case SlotKind::master:
    case SlotKind::remainder: return master_slot_for(vars_.at(i).dtype, options_) == kind;
    case SlotKind::momentum:
      return std::any_of(groups_.begin(), groups_.end(), [](const Group& g) { return g.momentum != 0.0; });
    case SlotKind::average: return options_.use_ema;
    case SlotKind::accumulator: return options_.gradient_accumulation_steps.value_or(0) >= 2;
  }
  return false;
}

void SGD::build(const std::vector<TensorView>& variables, const std::vector<bool>& decays,
                const std::vector<size_t>& groups) {
  if (built_) throw ValueError("the optimizer is already built");
  if (!decays.empty() && decays.size() != variables.size())
    throw ValueError("decays must have one entry per variable");
  if (!groups.empty() && groups.size() != variables.size())
    throw ValueError("groups must have one entry per variable");
  for (size_t i = 0; i < groups.size(); ++i)
    if (groups[i] >= groups_.size())
      throw ValueError(describe("groups", i) + " is " + std::to_string(groups[i]) + " but the optimizer has " +
                       std::to_string(groups_.size()) + " groups");
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
    if (options_.master_weights && *options_.master_weights == MasterForm::remainder && v.dtype == DType::float16)
      throw ValueError("`master_weights='remainder'` needs bfloat16 variables (their float32 master is "
                       "the variable's bits plus 16 more); " + describe("variables", i) +
                       " is float16: use master_weights='float32'");
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
  vars_ = variables;
  for (size_t i = 0; i < variables.size(); ++i) {
    const DType sd = slot_dtype_for(variables[i].dtype, options_);
    impl->slot_dtypes.push_back(sd);
    for (int k = 0; k < kNumSlotKinds; ++k) {
      const bool allocate = !options_.caller_owned_slots && wants_slot(SlotKind(k), i);
      const DType kd = k == int(SlotKind::master) ? DType::float32 : k == int(SlotKind::remainder) ? DType::bfloat16 : sd;
      impl->slots[k].push_back(allocate ? impl->backend->allocate_zeroed(variables[i].numel * dtype_size(kd))
                                        : nullptr);
    }
    // A float32 master starts as its variable's value (a remainder as zeros: the variable's
    // bits with a zero low half are the master exactly). Through the host, so that every
    // backend widens with the same to_float; an empty variable may have no data to copy.
    void* master = impl->slots[int(SlotKind::master)][i];
    if (master && variables[i].numel > 0) {
      const TensorView& v = variables[i];
      std::vector<uint16_t> bits(size_t(v.numel));
      std::vector<float> wide(size_t(v.numel));
      impl->backend->copy_to_host(bits.data(), v.data, v.nbytes());
      for (size_t e = 0; e < bits.size(); ++e)
        wide[e] = v.dtype == DType::bfloat16 ? to_float(bfloat16_t{bits[e]}) : to_float(half_t{bits[e]});
      impl->backend->copy_from_host(master, wide.data(), v.numel * 4);
    }
  }
  impl->plan.tasks.reserve(variables.size());
  impl->intervals.reserve((2 + kNumSlotKinds) * variables.size());
  for (auto& v : vars_) v.data = nullptr;
  decays_ = decays.empty() ? std::vector<bool>(variables.size(), true) : decays;
  group_of_ = groups.empty() ? std::vector<size_t>(variables.size(), 0) : groups;
  momentum_started_.assign(variables.size(), 0);
  impl_ = std::move(impl);
  built_ = true;
}

void SGD::set_decays(size_t i, bool decays) {
  if (i >= decays_.size()) throw ValueError("variable index " + std::to_string(i) + " is out of range");
  decays_[i] = decays;
}

bool SGD::update_is_due() const {
  const int64_t k = options_.gradient_accumulation_steps.value_or(0);
  return k < 2 || raw_iterations_ % k == k - 1;
}

bool SGD::next_step_touches_all() const {
  return options_.use_ema || (options_.gradient_accumulation_steps.value_or(0) >= 2 && update_is_due());
}

int64_t SGD::iterations() const {
  const int64_t k = options_.gradient_accumulation_steps.value_or(0);
  return k >= 2 ? raw_iterations_ / k : raw_iterations_;
}

void SGD::set_raw_iterations(int64_t value) {
  if (value < 0) throw ValueError("iterations must be >= 0, got " + std::to_string(value));
  raw_iterations_ = value;
}

void SGD::set_skipped_steps(int64_t value) {
  if (value < 0) throw ValueError("skipped_steps must be >= 0, got " + std::to_string(value));
  skipped_steps_ = value;
}

bool SGD::has_slot(SlotKind kind) const {
  if (!built_) return false;
  const auto& list = impl_->slots[int(kind)];
  return std::any_of(list.begin(), list.end(), [](void* p) { return p != nullptr; });
}

TensorView SGD::slot(SlotKind kind, size_t i) const {
  if (!built_ || i >= vars_.size()) throw ValueError("no such slot");
  TensorView v;
  v.data = impl_->slots[int(kind)][i];
  v.numel = v.data ? vars_[i].numel : 0;
  v.dtype = slot_dtype(kind, i);
  v.device = impl_->device;
  return v;
}

bool SGD::momentum_started(size_t i) const {
  if (i >= momentum_started_.size()) throw ValueError("variable index " + std::to_string(i) + " is out of range");
  return momentum_started_[i] != 0;
}

void SGD::set_momentum_started(size_t i, bool started) {
  if (i >= momentum_started_.size()) throw ValueError("variable index " + std::to_string(i) + " is out of range");
  momentum_started_[i] = started ? 1 : 0;
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

void SGD::apply_streams(const StepRequest& r) {
  if (r.stream) impl_->backend->set_stream(*r.stream);
  if (r.wait_for_stream) impl_->backend->wait_for_stream(*r.wait_for_stream);
}

void SGD::wait_for_stream(uintptr_t producer_stream) {
  if (built_) impl_->backend->wait_for_stream(producer_stream);
}

// Every check of a step, in one place, before anything is written.
void SGD::validate_request(const StepRequest& r, bool touches_all, bool update_call, bool measuring) const {
  if (!r.variables || !r.grads) throw ValueError("a step needs variable and gradient arrays");
  const size_t n = vars_.size();
  bool any = false;
  auto same_kind = [&](const TensorView& t, size_t i, const char* what, DType want) {
    if (t.dtype != want)
      throw TypeError(describe(what, i) + " has dtype " + dtype_name(t.dtype) + ", expected " + dtype_name(want));
    if (t.numel != vars_[i].numel)
      throw ValueError(describe(what, i) + " has " + std::to_string(t.numel) + " elements, expected " +
                       std::to_string(vars_[i].numel));
    if (t.device != impl_->device)
      throw ValueError(describe(what, i) + " is on " + device_name(t.device) + ", expected " +
                       device_name(impl_->device));
    if (t.numel > 0 && !t.data) throw ValueError(describe(what, i) + " has no data");
  };
  const bool accumulating = options_.gradient_accumulation_steps.value_or(0) >= 2;
  for (size_t i = 0; i < n; ++i) {
    const bool has_grad = r.grads[i].data != nullptr;
    if (has_grad) {
      any = true;
      same_kind(r.grads[i], i, "grads", vars_[i].dtype);
    }
    if (!has_grad && !touches_all) continue;
    same_kind(r.variables[i], i, "variables", vars_[i].dtype);
    if (!options_.caller_owned_slots || vars_[i].numel == 0) continue;
    const bool updates = !measuring && has_grad && update_call;
    const std::optional<SlotKind> master = master_slot_for(vars_[i].dtype, options_);
    const bool needs[kNumSlotKinds] = {
        updates && groups_[group_of_[i]].momentum != 0.0,
        !measuring && options_.use_ema,
        accumulating && (has_grad || update_call) && !(measuring && !(has_grad && update_call)),
        updates && master == SlotKind::master,
        updates && master == SlotKind::remainder};
    for (int k = 0; k < kNumSlotKinds; ++k) {
      if (!needs[k]) continue;
      if (!r.slots[k] || !r.slots[k][i].data)
        throw ValueError(describe(kSlotArgs[k], i) + " is missing: the optimizer owns no slots "
                         "(caller_owned_slots) and this step needs the " + slot_kind_name(SlotKind(k)) +
                         " slot of variables[" + std::to_string(i) + "]");
      same_kind(r.slots[k][i], i, kSlotArgs[k], slot_dtype(SlotKind(k), i));
    }
  }
  if (!any) throw ValueError("No gradients provided for any variable.");
  if (r.learning_rate && !std::isfinite(*r.learning_rate))
    throw ValueError("`learning_rate` must be a finite float. Received: learning_rate=" + repr(*r.learning_rate));
  if (!(std::isfinite(r.grad_scale) && r.grad_scale > 0))
    throw ValueError("`grad_scale` must be a finite float > 0. Received: grad_scale=" + repr(r.grad_scale));
  if (r.global_sum_squares && !(*r.global_sum_squares >= 0 || std::isnan(*r.global_sum_squares)))
    throw ValueError("`global_sum_squares` must be >= 0 (or NaN / inf from overflowing gradients). Received: " +
                     repr(*r.global_sum_squares));
}

// Fills impl_->plan for the request (already validated), and checks buffer overlaps.
void SGD::plan_step(const StepRequest& r, bool update_call, bool touches_all) {
  const Options& o = options_;
  const int64_t window = o.gradient_accumulation_steps.value_or(0);
  const bool accumulating = window >= 2;
  const size_t n = vars_.size();
  Impl& im = *impl_;

  auto slot_ptr = [&](int k, size_t i) -> void* {
    if (o.caller_owned_slots) return r.slots[k] ? r.slots[k][i].data : nullptr;
    return im.slots[k][i];
  };

  // Overlap check, skipped when the buffers are exactly those of the last validated step.
  im.pointers.clear();
  for (size_t i = 0; i < n; ++i) {
    im.pointers.push_back(r.variables[i].data);
    im.pointers.push_back(r.grads[i].data);
    if (o.caller_owned_slots)
      for (int k = 0; k < kNumSlotKinds; ++k) im.pointers.push_back(slot_ptr(k, i));
  }
  if (im.pointers != im.last_pointers) {
    im.intervals.clear();
    for (size_t i = 0; i < n; ++i) {
      if (vars_[i].numel == 0) continue;
      auto add = [&](const void* p, int64_t bytes, bool written, const char* what) {
        if (!p) return;
        const auto b = reinterpret_cast<uintptr_t>(p);
        im.intervals.push_back({b, b + uintptr_t(bytes), written, what, i});
      };
      add(r.variables[i].data, vars_[i].nbytes(), true, "variables");
      add(r.grads[i].data, vars_[i].nbytes(), false, "grads");
      if (o.caller_owned_slots)
        for (int k = 0; k < kNumSlotKinds; ++k)
          add(slot_ptr(k, i), vars_[i].numel * dtype_size(slot_dtype(SlotKind(k), i)), true, kSlotArgs[k]);
    }
    check_overlaps(im.intervals);
    im.last_pointers.swap(im.pointers);
  }

  detail::StepPlan& plan = im.plan;
  StepScalars& s = plan.scalars;
  s = StepScalars{};
  s.grad_scale = (o.loss_scale_factor ? 1.0 / *o.loss_scale_factor : 1.0) * r.grad_scale;
  s.window = (accumulating && update_call) ? double(window) : 1.0;
  s.clip_value = positive_or_zero(o.clipvalue);
  const int64_t public_iterations = iterations();
  s.ema_keep = (o.use_ema && public_iterations != 0) ? o.ema_momentum : 0.0;
  s.merge_window = accumulating && update_call;
  s.reset_accumulator = accumulating && update_call;
  const int64_t every = o.ema_overwrite_frequency.value_or(0);
  s.ema_overwrite = o.use_ema && every > 0 && (public_iterations + 1) % every == 0;

  plan.features.merge_window = s.merge_window;
  plan.features.ema = o.use_ema;
  plan.features.grad_transforms = s.grad_scale != 1.0 || s.clip_value > 0;
  const double clipnorm = positive_or_zero(o.clipnorm), global_clipnorm = positive_or_zero(o.global_clipnorm);
  plan.norm_clip = !update_call           ? detail::NormClip::none
                   : clipnorm > 0         ? detail::NormClip::per_tensor
                   : global_clipnorm > 0  ? detail::NormClip::global
                                          : detail::NormClip::none;
  plan.clipnorm = clipnorm > 0 ? clipnorm : global_clipnorm;
  plan.features.norm_clip = plan.norm_clip != detail::NormClip::none;
  plan.external_global = r.global_sum_squares.has_value();
  plan.global_sum_squares = r.global_sum_squares.value_or(0.0);
  plan.measured_valid = false;

  plan.tasks.clear();
  plan.narrow_global_norm = false;
  for (size_t i = 0; i < n; ++i) {
    detail::PassTask t;
    if (r.grads[i].data) {
      t.kind = update_call ? PassKind::update : PassKind::accumulate;
    } else if (touches_all) {
      t.kind = PassKind::idle;
    } else {
      continue;
    }
    const Group& g = groups_[group_of_[i]];
    t.index = i;
    t.rule = o.convention;
    t.momentum = g.momentum == 0.0 ? MomentumKind::none
                 : g.nesterov     ? MomentumKind::nesterov
                                  : MomentumKind::heavy_ball;
    t.var_dtype = vars_[i].dtype;
    t.slot_dtype = im.slot_dtypes[i];
    t.numel = vars_[i].numel;
    t.w = r.variables[i].data;
    t.g = r.grads[i].data;
    t.m = t.momentum != MomentumKind::none ? slot_ptr(int(SlotKind::momentum), i) : nullptr;
    t.avg = slot_ptr(int(SlotKind::average), i);
    t.acc = slot_ptr(int(SlotKind::accumulator), i);
    t.ts.learning_rate = update_call ? r.learning_rate.value_or(g.learning_rate) : 0.0;
    t.ts.momentum = g.momentum;
    t.ts.dampening = g.dampening;
    t.ts.weight_decay = decays_[i] ? g.weight_decay : 0.0;
    // No L2 term without weight decay: fma(w, 0, g) is not g for an infinite w or g = -0, and
    // the 16-bit update passes always run the decay (the others skip it at weight decay 0).
    t.ts.decay_l2 = t.ts.weight_decay != 0.0 && decay_form_of(g, o.convention) == DecayForm::l2;
    t.ts.maximize = g.maximize;
    if (const std::optional<SlotKind> master = master_slot_for(t.var_dtype, o)) {
      t.form = *master == SlotKind::master ? detail::VarForm::master : detail::VarForm::remainder;
      t.master = slot_ptr(int(*master), i);
    }
    if (o.stochastic_rounding && is_16bit(t.var_dtype)) {
      t.stochastic = true;
      // Remainders regenerate the bits that rounded the last stored value: no step in the key.
      const bool stepless = t.form == detail::VarForm::remainder;
      t.ts.random_stream = math::random_stream(o.seed, stepless ? math::kStepless : uint64_t(raw_iterations_), i);
    }
    if (o.convention == Convention::torch && t.momentum != MomentumKind::none) {
      t.ts.fresh_momentum = o.caller_owned_slots ? (r.fresh_momentum && r.fresh_momentum[i] != 0)
                                                 : momentum_started_[i] == 0;
    }
    if (t.numel > 0) plan.tasks.push_back(t);
    if (t.kind == PassKind::update && t.var_dtype != DType::float64) plan.narrow_global_norm = true;
  }
}

StepResult SGD::step(const StepRequest& r) {
  if (!built_) throw ValueError("build() the optimizer before step()");
  if (raw_iterations_ == std::numeric_limits<int64_t>::max())
    throw ValueError("iterations is at its largest value (2**63 - 1); another step would overflow it");
  const bool update_call = update_is_due();
  const bool touches_all = next_step_touches_all();
  validate_request(r, touches_all, update_call);
  plan_step(r, update_call, touches_all);
  apply_streams(r);

  detail::StepPlan& plan = impl_->plan;
  bool skip = r.found_inf.value_or(false);
  if (!skip && !r.found_inf && options_.skip_nonfinite) {
    if (r.global_sum_squares) {
      skip = !std::isfinite(*r.global_sum_squares);
    } else {
      impl_->backend->measure(plan);
      plan.measured_valid = true;
      skip = plan.measured.nonfinite;
    }
  }
  StepResult result;
  if (skip) {
    ++skipped_steps_;
    result.skipped = true;
    return result;
  }
  // Engine-owned momentum slots appear the first time a group asks for momentum, once the step
  // is known to go ahead (a refused or skipped step allocates nothing).
  if (!options_.caller_owned_slots && update_call && !has_slot(SlotKind::momentum) &&
      wants_slot(SlotKind::momentum, 0)) {
    Impl& im = *impl_;
    std::vector<void*> fresh(vars_.size(), nullptr);
    try {
      for (size_t i = 0; i < vars_.size(); ++i)
        fresh[i] = im.backend->allocate_zeroed(vars_[i].numel * dtype_size(im.slot_dtypes[i]));
    } catch (...) {
      for (void* p : fresh)
        if (p) im.backend->release(p);
      throw;
    }
    im.slots[int(SlotKind::momentum)] = std::move(fresh);
    for (auto& t : plan.tasks)
      if (t.momentum != MomentumKind::none) t.m = impl_->slots[int(SlotKind::momentum)][t.index];
  }
  impl_->backend->execute(plan);
  if (options_.convention == Convention::torch && update_call) {
    for (const auto& t : plan.tasks)
      if (t.kind == PassKind::update && t.momentum != MomentumKind::none) momentum_started_[t.index] = 1;
  }
  ++raw_iterations_;
  result.updated = update_call;
  return result;
}

StepResult SGD::step(const std::vector<TensorView>& variables, const std::vector<TensorView>& grads,
                     double learning_rate) {
  if (variables.size() != vars_.size() || grads.size() != vars_.size())
    throw ValueError("step() needs one variable view and one gradient view per built variable (" +
                     std::to_string(vars_.size()) + ")");
  StepRequest r;
  r.variables = variables.data();
  r.grads = grads.data();
  r.learning_rate = learning_rate;
  return step(r);
}

GradStats SGD::grad_stats(const StepRequest& r) {
  if (!built_) throw ValueError("build() the optimizer before grad_stats()");
  const bool update_call = update_is_due();
  validate_request(r, false, update_call, true);
  plan_step(r, update_call, false);
  apply_streams(r);
  detail::StepPlan& plan = impl_->plan;
  impl_->backend->measure(plan);
  GradStats stats;
  stats.sum_squares.assign(vars_.size(), 0.0);
  for (size_t t = 0; t < plan.tasks.size(); ++t) stats.sum_squares[plan.tasks[t].index] = plan.measured.task_sums[t];
  stats.total = plan.measured.total;
  stats.nonfinite = plan.measured.nonfinite;
  return stats;
}

void SGD::finalize_variable_values(const std::vector<TensorView>& variables) {
  if (!options_.use_ema || !built_) return;
  if (options_.caller_owned_slots)
    throw ValueError("finalize_variable_values() needs engine-owned averages; with caller-owned slots, copy "
                     "each average into its variable yourself");
  if (variables.size() != vars_.size())
    throw ValueError("finalize_variable_values() got " + std::to_string(variables.size()) +
                     " variables, but the optimizer holds " + std::to_string(vars_.size()) + " averages");
  for (size_t i = 0; i < variables.size(); ++i) {
    const TensorView& spec = vars_[i];
    const TensorView& v = variables[i];
    if (v.dtype != spec.dtype || v.numel != spec.numel || v.device != impl_->device || (v.numel > 0 && !v.data))
      throw ValueError(describe("variables", i) + " does not match the variable built at that position");
  }
  detail::StepPlan& plan = impl_->plan;
  plan.scalars = StepScalars{};
  plan.features = detail::PassFeatures{};
  plan.norm_clip = detail::NormClip::none;
  plan.measured_valid = false;
  plan.tasks.clear();
  for (size_t i = 0; i < variables.size(); ++i) {
    detail::PassTask t;
    t.kind = PassKind::finalize;
    t.index = i;
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
