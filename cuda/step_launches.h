// From a StepPlan to the launches that execute or measure it on a GPU, and the order they
// run in. Host-only and free of CUDA calls: the CUDA backend (cuda_backend.cpp) runs the
// sequences with kernel launches, and tests/gpu runs them with the same block functions on
// the host.
//
//   measure:         sum-of-squares launches over the tasks with a gradient (one Pair per
//                    chunk) -> per-tensor rows (sum, probe), which the backend copies out
//   execute, norm clip computed on the device (no sums measured yet, no external sum):
//                    the same sum-of-squares launches -> per-tensor rows + per-tensor clip
//                    coefficients -> global clip scale (global_clipnorm)
//   execute, always: one pass launch per (storage combination, pass kind, rule, momentum
//                    kind, 16-bit storage form) and up to kMaxTensors tensors, reading the
//                    clip table when the coefficients are computed on the device
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "plan.h"
#include "sgd_functor.cuh"

namespace fastsgd {
namespace gpu {

// Storage combination of a task, as the CPU's select_pass chooses it.
inline Combo combo_of(DType var, DType slot) {
  const bool wide = slot == DType::float32;
  switch (var) {
    case DType::float32: return Combo::f32;
    case DType::float64: return Combo::f64;
    case DType::float16: return wide ? Combo::f16_f32 : Combo::f16_f16;
    case DType::bfloat16: return wide ? Combo::bf16_f32 : Combo::bf16_bf16;
  }
  return Combo::f32;
}

inline int var_size(Combo c) { return c == Combo::f64 ? 8 : (c == Combo::f32 ? 4 : 2); }
inline int slot_size(Combo c) {
  return (c == Combo::f64) ? 8 : ((c == Combo::f16_f16 || c == Combo::bf16_bf16) ? 2 : 4);
}

// Norm-clip coefficients from sums already on the host -- this step's measured sums, or a
// global sum computed outside -- written into the tasks as the CPU backend does. Returns
// false when the device must compute them (nothing measured, no external sum).
inline bool host_clip_coefficients(detail::StepPlan& plan) {
  if (plan.norm_clip == detail::NormClip::none) return false;
  const bool global = plan.norm_clip == detail::NormClip::global;
  if (!plan.measured_valid && !(global && plan.external_global)) return false;
  if (!global) {
    for (size_t t = 0; t < plan.tasks.size(); ++t) {
      detail::PassTask& task = plan.tasks[t];
      if (task.kind != PassKind::update) continue;
      math::clipnorm_coeffs<double>(math::keras_sum_squares(plan.measured.task_sums[t],
                                                            task.var_dtype != DType::float64),
                                    plan.clipnorm, task.ts.clip_mul, task.ts.clip_div);
    }
    return true;
  }
  const double sum = plan.external_global ? plan.global_sum_squares : plan.measured.total;
  const double scale =
      math::global_clip_scale<double>(math::keras_sum_squares(sum, plan.narrow_global_norm), plan.clipnorm);
  for (detail::PassTask& task : plan.tasks) {
    task.ts.clip_mul = scale;
    task.ts.clip_div = 1.0;
  }
  return true;
}

// The functor of a task's update pass: LowpUpdateFunctor for a 16-bit variable with a master
// or stochastic rounding (the engine sets these only for 16-bit variables), else the common one.
inline Lowp lowp_of(const detail::PassTask& t) {
  if (t.kind != PassKind::update || (t.var_dtype != DType::float16 && t.var_dtype != DType::bfloat16))
    return Lowp::none;
  switch (t.form) {
    case detail::VarForm::master: return Lowp::master;
    case detail::VarForm::remainder: return Lowp::remainder;
    case detail::VarForm::plain: break;
  }
  return t.stochastic ? Lowp::plain : Lowp::none;
}

inline bool has_gradient(const detail::PassTask& t) {
  return t.kind == PassKind::update || t.kind == PassKind::accumulate;
}

struct Launch {
  Combo combo = Combo::f32;
  PassKind kind = PassKind::update;
  Convention rule = Convention::keras;
  MomentumKind momentum = MomentumKind::none;
  Lowp lowp = Lowp::none;
  LaunchMeta meta;
  int64_t blocks() const { return launch_chunks(meta); }
};

inline PassVariant variant_of(const Launch& l, const detail::PassFeatures& f) {
  PassVariant v;
  v.kind = l.kind;
  v.rule = l.rule;
  v.momentum = l.momentum;
  v.merge = f.merge_window;
  v.ema = f.ema;
  v.lowp = l.lowp;
  return v;
}

// Launch groups per storage combination: update variants (16-bit form x rule x momentum
// kind), then accumulate, idle and finalize.
constexpr int kUpdateGroups = kNumLowp * 6;
constexpr int kPassGroups = kUpdateGroups + 3;
inline int pass_group(const detail::PassTask& t) {
  switch (t.kind) {
    case PassKind::accumulate: return kUpdateGroups;
    case PassKind::idle: return kUpdateGroups + 1;
    case PassKind::finalize: return kUpdateGroups + 2;
    case PassKind::update: break;
  }
  return int(lowp_of(t)) * 6 + int(t.rule) * 3 + int(t.momentum);
}

class StepLaunches {
 public:
  const detail::StepPlan* plan = nullptr;
  bool device_clip = false;  // the passes read clip coefficients from the device clip table
  size_t norm_count = 0;     // launches()[0, norm_count): sum-of-squares launches
  size_t pass_count = 0;     // then the pass launches
  int64_t norm_chunks = 0;   // rows of the per-chunk partial table
  int32_t norm_rows = 0;     // tasks with a gradient: rows of the per-tensor sums table
  std::vector<size_t> row_task;  // the plan's task index of each row

  const Launch& norm(size_t i) const { return storage_[i]; }
  const Launch& pass(size_t i) const { return storage_[norm_count + i]; }
  // Rows of the clip table: one per update task (clipnorm) or one (global_clipnorm).
  int64_t clip_rows() const { return norm_rows > 0 ? norm_rows : 1; }

  // The sum-of-squares launches of measure(), and no passes.
  void build_measure(const detail::StepPlan& p) {
    start(p, false);
    add_norms(p);
  }

  // The launches of execute(). `device_clip`: the plan clips by norm and the coefficients are
  // not in its tasks yet (host_clip_coefficients returned false).
  void build(const detail::StepPlan& p, bool clip_on_device) {
    start(p, clip_on_device);
    if (clip_on_device) add_norms(p);
    const bool global = p.norm_clip == detail::NormClip::global;
    open_.fill(-1);
    int32_t row = 0;
    for (const detail::PassTask& t : p.tasks) {
      if (t.numel <= 0) continue;
      const Combo c = combo_of(t.var_dtype, t.slot_dtype);
      int32_t aux = -1;
      if (clip_on_device && has_gradient(t)) aux = global ? 0 : row++;
      uint32_t flags = 0;
      double scalars[kTensorScalars];
      pack_tensor_scalars(t.ts, scalars, flags);
      if (t.kind == PassKind::idle) {
        if (t.avg) flags |= kHasAvg;
        if (p.scalars.reset_accumulator && t.acc) flags |= kResetAcc;
      }
      const Lowp lowp = lowp_of(t);
      if (lowp != Lowp::none && t.stochastic) flags |= kStochastic;
      LaunchMeta& meta = open_launch(int(c) * kPassGroups + pass_group(t), c, t);
      add_task(meta, t, c, aux, flags, scalars, lowp);
    }
    pass_count = used_ - norm_count;
  }

 private:
  void start(const detail::StepPlan& p, bool clip_on_device) {
    plan = &p;
    device_clip = clip_on_device;
    used_ = 0;
    norm_count = pass_count = 0;
    norm_chunks = 0;
    norm_rows = 0;
    row_task.clear();
  }

  // One row per task with a gradient, in task order; launches grouped by storage combination.
  void add_norms(const detail::StepPlan& p) {
    open_.fill(-1);
    const double none[kTensorScalars] = {};
    for (size_t i = 0; i < p.tasks.size(); ++i) {
      const detail::PassTask& t = p.tasks[i];
      if (!has_gradient(t) || t.numel <= 0) continue;
      const Combo c = combo_of(t.var_dtype, t.slot_dtype);
      LaunchMeta& meta = open_launch(int(c), c, t);
      row_task.push_back(i);
      add_task(meta, t, c, norm_rows++, c == Combo::f64 ? 0u : kNarrowNorm, none);
    }
    norm_count = used_;
    // Chunk partials of launch i follow those of launch i - 1.
    for (size_t i = 0; i < norm_count; ++i) {
      storage_[i].meta.partial_base = norm_chunks;
      norm_chunks += storage_[i].blocks();
    }
  }

  // The open launch for `key`, or a fresh one when there is none or it is full.
  LaunchMeta& open_launch(int key, Combo c, const detail::PassTask& t) {
    int& slot = open_[size_t(key)];
    if (slot < 0 || !launch_fits(storage_[size_t(slot)].meta, t.numel)) {
      if (used_ == storage_.size()) storage_.emplace_back();
      slot = int(used_++);
      Launch& l = storage_[size_t(slot)];
      l.combo = c;
      l.kind = t.kind;
      l.rule = t.rule;
      l.momentum = t.momentum;
      l.lowp = lowp_of(t);
      launch_reset(l.meta);
    }
    return storage_[size_t(slot)].meta;
  }

  // `lowp`: the task's update functor; its master or remainder slot travels only with it.
  static void add_task(LaunchMeta& meta, const detail::PassTask& t, Combo c, int32_t aux, uint32_t flags,
                       const double (&scalars)[kTensorScalars], Lowp lowp = Lowp::none) {
    const bool master = lowp == Lowp::master || lowp == Lowp::remainder;
    void* const ptr[kSlots] = {t.w, const_cast<void*>(t.g), t.m, t.acc, t.avg, master ? t.master : nullptr};
    const int vs = var_size(c), ss = slot_size(c);
    const int size[kSlots] = {vs, vs, ss, ss, ss, lowp == Lowp::remainder ? 2 : 4};
    launch_add(meta, ptr, size, t.numel, aux, flags, t.ts.random_stream, scalars);
  }

  std::vector<Launch> storage_;  // grows to the largest step seen, never shrinks
  size_t used_ = 0;
  std::array<int, kNumCombos * kPassGroups> open_{};
};

// The measured rows (sum, probe) of a measure sequence -> the plan's GradMeasure, with the
// total added in task order as the CPU backend does.
inline void collect_measure(const StepLaunches& L, const Pair* rows, detail::GradMeasure& m) {
  const size_t n = L.plan->tasks.size();
  m.task_sums.assign(n, 0.0);
  m.nonfinite = false;
  for (size_t r = 0; r < L.row_task.size(); ++r) {
    m.task_sums[L.row_task[r]] = rows[r].a;
    m.nonfinite = m.nonfinite || probe_nonfinite(rows[r].b);
  }
  m.total = 0.0;
  for (double v : m.task_sums) m.total += v;
}

// Runs a packed step with a runner that provides
//   sum_squares(Combo, bool merge, const LaunchMeta&, const StepScalars&)
//   tensor_norms(const LaunchMeta&, bool per_tensor, double clipnorm)
//   global_clip(int32_t rows, double clipnorm, bool narrow)
//   pass(Combo, const PassVariant&, const LaunchMeta&, const StepScalars&, bool uses_clip_table)
template <class Runner>
void run_step(const StepLaunches& L, Runner& r) {
  const detail::StepPlan& p = *L.plan;
  if (L.device_clip) {
    const bool per_tensor = p.norm_clip == detail::NormClip::per_tensor;
    for (size_t i = 0; i < L.norm_count; ++i)
      r.sum_squares(L.norm(i).combo, p.features.merge_window, L.norm(i).meta, p.scalars);
    for (size_t i = 0; i < L.norm_count; ++i) r.tensor_norms(L.norm(i).meta, per_tensor, p.clipnorm);
    if (!per_tensor) r.global_clip(L.norm_rows, p.clipnorm, p.narrow_global_norm);
  }
  for (size_t i = 0; i < L.pass_count; ++i) {
    const Launch& l = L.pass(i);
    r.pass(l.combo, variant_of(l, p.features), l.meta, p.scalars, L.device_clip);
  }
}

// Runs a packed measure (build_measure): afterwards the runner's sums table holds one row per
// task with a gradient.
template <class Runner>
void run_measure(const StepLaunches& L, Runner& r) {
  const detail::StepPlan& p = *L.plan;
  for (size_t i = 0; i < L.norm_count; ++i)
    r.sum_squares(L.norm(i).combo, p.features.merge_window, L.norm(i).meta, p.scalars);
  for (size_t i = 0; i < L.norm_count; ++i) r.tensor_norms(L.norm(i).meta, false, 0.0);
}

}  // namespace gpu
}  // namespace fastsgd
