// From a StepPlan to the launches that execute it on a GPU, and the order they run in.
// Host-only and free of CUDA calls: the CUDA backend (cuda_backend.cpp) runs the sequence with
// kernel launches, and tests/gpu runs it with the same block functions on the host.
//
//   norm clip only:  sum-of-squares launches over the update tasks (one partial per chunk)
//                    -> per-tensor norms (+ per-tensor clip coefficients)
//                    -> global clip scale (global_clipnorm)
//   always:          one pass launch per (storage combination, pass kind) and up to
//                    kMaxTensors tensors, reading the clip table when the step clips by norm.
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

inline PassVariant variant_of(PassKind kind, const detail::PassFeatures& f) {
  PassVariant v;
  v.kind = kind;
  v.momentum = f.momentum;
  v.merge = f.merge_window;
  v.ema = f.ema;
  return v;
}

struct Launch {
  Combo combo = Combo::f32;
  PassKind kind = PassKind::update;
  LaunchMeta meta;
  int64_t blocks() const { return launch_chunks(meta); }
};

class StepLaunches {
 public:
  const detail::StepPlan* plan = nullptr;
  size_t norm_count = 0;     // launches()[0, norm_count): sum-of-squares launches
  size_t pass_count = 0;     // then the pass launches
  int64_t norm_chunks = 0;   // rows of the per-chunk partial table
  int32_t norm_rows = 0;     // update tasks: rows of the per-tensor sums table

  const Launch& norm(size_t i) const { return storage_[i]; }
  const Launch& pass(size_t i) const { return storage_[norm_count + i]; }
  // Rows of the clip table: one per update task (clipnorm) or one (global_clipnorm).
  int64_t clip_rows() const { return norm_rows > 0 ? norm_rows : 1; }

  void build(const detail::StepPlan& p) {
    plan = &p;
    used_ = 0;
    norm_count = pass_count = 0;
    norm_chunks = 0;
    norm_rows = 0;
    const bool clip = p.norm_clip != detail::NormClip::none;
    const bool global = p.norm_clip == detail::NormClip::global;

    if (clip) {
      open_.fill(-1);
      for (const detail::PassTask& t : p.tasks) {
        if (t.kind != PassKind::update || t.numel <= 0) continue;
        const Combo c = combo_of(t.var_dtype, t.slot_dtype);
        LaunchMeta& meta = open_launch(int(c), c, PassKind::update, t.numel);
        add_task(meta, t, c, norm_rows++, 0u);
      }
      norm_count = used_;
      // Chunk partials of launch i follow those of launch i - 1.
      for (size_t i = 0; i < norm_count; ++i) {
        storage_[i].meta.partial_base = norm_chunks;
        norm_chunks += storage_[i].blocks();
      }
    }

    open_.fill(-1);
    int32_t row = 0;
    for (const detail::PassTask& t : p.tasks) {
      if (t.numel <= 0) continue;
      const Combo c = combo_of(t.var_dtype, t.slot_dtype);
      int32_t aux = -1;
      if (clip && t.kind == PassKind::update) aux = global ? 0 : row++;
      uint32_t flags = t.ts.decays ? kDecays : 0u;
      if (t.kind == PassKind::idle) {
        if (t.avg) flags |= kHasAvg;
        if (p.scalars.reset_accumulator && t.acc) flags |= kResetAcc;
      }
      LaunchMeta& meta = open_launch(int(c) * 4 + int(t.kind), c, t.kind, t.numel);
      add_task(meta, t, c, aux, flags);
    }
    pass_count = used_ - norm_count;
  }

 private:
  // The open launch for `key`, or a fresh one when there is none or it is full.
  LaunchMeta& open_launch(int key, Combo c, PassKind kind, int64_t numel) {
    int& slot = open_[size_t(key)];
    if (slot < 0 || !launch_fits(storage_[size_t(slot)].meta, numel)) {
      if (used_ == storage_.size()) storage_.emplace_back();
      slot = int(used_++);
      Launch& l = storage_[size_t(slot)];
      l.combo = c;
      l.kind = kind;
      launch_reset(l.meta);
    }
    return storage_[size_t(slot)].meta;
  }

  static void add_task(LaunchMeta& meta, const detail::PassTask& t, Combo c, int32_t aux, uint32_t flags) {
    void* const ptr[kSlots] = {t.w, const_cast<void*>(t.g), t.m, t.acc, t.avg};
    const int vs = var_size(c), ss = slot_size(c);
    const int size[kSlots] = {vs, vs, ss, ss, ss};
    launch_add(meta, ptr, size, t.numel, aux, flags);
  }

  std::vector<Launch> storage_;  // grows to the largest step seen, never shrinks
  size_t used_ = 0;
  std::array<int, kNumCombos * 4> open_{};
};

// Runs a packed step with a runner that provides
//   sum_squares(Combo, bool merge, const LaunchMeta&, const StepScalars&)
//   tensor_norms(const LaunchMeta&, bool per_tensor, double clipnorm)
//   global_clip(int32_t rows, double clipnorm)
//   pass(Combo, const PassVariant&, const LaunchMeta&, const StepScalars&, bool uses_clip_table)
template <class Runner>
void run_step(const StepLaunches& L, Runner& r) {
  const detail::StepPlan& p = *L.plan;
  const bool clip = p.norm_clip != detail::NormClip::none;
  if (clip) {
    const bool per_tensor = p.norm_clip == detail::NormClip::per_tensor;
    for (size_t i = 0; i < L.norm_count; ++i)
      r.sum_squares(L.norm(i).combo, p.features.merge_window, L.norm(i).meta, p.scalars);
    for (size_t i = 0; i < L.norm_count; ++i) r.tensor_norms(L.norm(i).meta, per_tensor, p.clipnorm);
    if (!per_tensor) r.global_clip(L.norm_rows, p.clipnorm);
  }
  for (size_t i = 0; i < L.pass_count; ++i) {
    const Launch& l = L.pass(i);
    r.pass(l.combo, variant_of(l.kind, p.features), l.meta, p.scalars, clip);
  }
}

}  // namespace gpu
}  // namespace fastsgd
