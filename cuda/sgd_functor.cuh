// The SGD functor: what one block does to the chunk multi_tensor_apply.cuh gives it. It
// loads lanes of elements, calls math.h, and stores them back; every formula is math.h's
// (the same functions the CPU walk calls), so the update is bit-identical to the CPU engine
// when both are built without floating-point contraction.
//
// Buffer slots of every SGD launch (TensorMeta::ptr):
//   ptr[kW]    the variable, storage type W                       read and written
//   ptr[kG]    its gradient, storage type W                       read only
//   ptr[kM]    momentum slot, storage type S                      update passes with momentum
//   ptr[kAcc]  gradient accumulator slot, storage type S          accumulation
//   ptr[kAvg]  EMA average slot, storage type S                   use_ema
// TensorMeta::aux    row of the device clip table: (clip_mul, clip_div) as doubles at
//                    clip[2 * aux], clip[2 * aux + 1]; -1 when the step has no norm clip.
//                    In sum-of-squares launches: the tensor's row of the norm tables.
// TensorMeta::flags  kDecays (weight decay applies), kHasAvg and kResetAcc (idle passes).
//
// Storage combinations (W, S), exactly as the CPU's select_pass (cpp/src/cpu/walk.inc):
//   (float, float) (double, double) (half_t, float) (half_t, half_t)
//   (bfloat16_t, float) (bfloat16_t, bfloat16_t); math in float, or double for double.
//
// Instantiations are kept lean for compile time: PassKind, momentum kind, window merging and
// EMA change what is read and written and are template parameters; norm clipping only
// changes two scalars, so update passes always apply it, with (1, 1) when the step has no
// norm clip -- (g * 1) / 1 == g exactly, so this equals the CPU's no-clip instantiation.
#pragma once

#include <cstdint>

#include "fastsgd/dtype.h"
#include "fastsgd/math.h"
#include "fastsgd/step.h"
#include "multi_tensor_apply.cuh"

namespace fastsgd {
namespace gpu {

enum : int { kW = 0, kG = 1, kM = 2, kAcc = 3, kAvg = 4 };

// TensorMeta::flags bits of SGD launches (bit 0 is the walk's kAligned).
constexpr uint32_t kDecays = 2u;
constexpr uint32_t kHasAvg = 4u;
constexpr uint32_t kResetAcc = 8u;

enum class Combo : int32_t { f32 = 0, f64 = 1, f16_f32 = 2, f16_f16 = 3, bf16_f32 = 4, bf16_bf16 = 5 };
constexpr int kNumCombos = 6;

// What one pass launch runs: the pass kind and the step-wide features that are compiled in.
struct PassVariant {
  PassKind kind = PassKind::update;
  MomentumKind momentum = MomentumKind::none;
  bool merge = false;
  bool ema = false;
};

inline namespace FASTSGD_ISA_NS {

// Which buffers an op reads and writes.
struct Access {
  bool w_in, g_in, m_in, acc_in, avg_in;
  bool w_out, m_out, acc_out, avg_out;
};

// ---- the element ops: registers in, registers out, math.h only ------------------------------

template <class C, MomentumKind MK, bool Merge, bool Ema>
struct UpdateOp {
  static constexpr bool kMom = MK != MomentumKind::none;
  static FASTSGD_HD Access access(uint32_t) {
    return {true, true, kMom, Merge, Ema, true, kMom, Merge, Ema};
  }
  static FASTSGD_HD void element(C& w, C g, C& m, C& acc, C& avg, const math::Coeffs<C>& k, uint32_t) {
    math::update<C, MK, Merge, /*NormClip=*/true, Ema>(w, g, m, acc, avg, k);
  }
};

template <class C, bool Ema>
struct AccumulateOp {
  static FASTSGD_HD Access access(uint32_t) {
    return {Ema, true, false, true, Ema, Ema, false, true, Ema};
  }
  static FASTSGD_HD void element(C& w, C g, C&, C& acc, C& avg, const math::Coeffs<C>& k, uint32_t) {
    math::accumulate_only<C, Ema>(w, g, acc, avg, k);
  }
};

// A variable without a gradient this call: EMA (when it has an average) and the
// end-of-window accumulator reset.
template <class C>
struct IdleOp {
  static FASTSGD_HD Access access(uint32_t flags) {
    const bool avg = (flags & kHasAvg) != 0;
    const bool reset = (flags & kResetAcc) != 0;
    return {avg, false, false, false, avg, avg, false, reset, avg};
  }
  static FASTSGD_HD void element(C& w, C, C&, C& acc, C& avg, const math::Coeffs<C>& k, uint32_t flags) {
    if (flags & kHasAvg) math::ema_only(w, avg, k);
    if (flags & kResetAcc) acc = C(0);
  }
};

template <class C>
struct FinalizeOp {
  static FASTSGD_HD Access access(uint32_t) {
    return {false, false, false, false, true, true, false, false, false};
  }
  static FASTSGD_HD void element(C& w, C, C&, C&, C& avg, const math::Coeffs<C>&, uint32_t) {
    math::take_average(w, avg);
  }
};

template <class T>
FASTSGD_HD T* at(void* p, int64_t offset) {
  return p ? static_cast<T*>(p) + offset : nullptr;
}

template <class C>
FASTSGD_HD void zero_lanes(C (&v)[kILP]) {
  FASTSGD_UNROLL
  for (int j = 0; j < kILP; ++j) v[j] = C(0);
}

// ---- the pass functor -------------------------------------------------------------------------

template <class W, class S, class Op>
struct SgdFunctor {
  using C = typename compute_type<W>::type;

  // Thread `tid` of block `b`: its lanes of the block's chunk, kBlockThreads * kILP apart.
  // No thread reads what another writes, so the host may run threads one after another.
  static FASTSGD_HD void block(const LaunchMeta& meta, int64_t b, int tid, const StepScalars& s,
                               const double* clip) {
    const ChunkRef c = locate_chunk(meta, b);
    const TensorMeta& t = meta.tensors[c.tensor];
    TensorScalars ts;
    ts.decays = (t.flags & kDecays) != 0;
    if (t.aux >= 0) {
      ts.clip_mul = clip[2 * int64_t(t.aux)];
      ts.clip_div = clip[2 * int64_t(t.aux) + 1];
    }
    const math::Coeffs<C> k = math::make_coeffs<C>(s, ts);
    const Access a = Op::access(t.flags);
    W* w = at<W>(t.ptr[kW], c.begin);
    const W* g = at<const W>(t.ptr[kG], c.begin);
    S* m = at<S>(t.ptr[kM], c.begin);
    S* acc = at<S>(t.ptr[kAcc], c.begin);
    S* avg = at<S>(t.ptr[kAvg], c.begin);
    const bool aligned = (t.flags & kAligned) != 0;
    for (int i = tid * kILP; i < c.n; i += kBlockThreads * kILP) {
      const int lanes = c.n - i < kILP ? c.n - i : kILP;
      const bool vec = aligned && lanes == kILP;
      C wv[kILP], gv[kILP], mv[kILP], accv[kILP], avgv[kILP];
      if (a.w_in) load_lanes(wv, w + i, vec, lanes); else zero_lanes(wv);
      if (a.g_in) load_lanes(gv, g + i, vec, lanes); else zero_lanes(gv);
      if (a.m_in) load_lanes(mv, m + i, vec, lanes); else zero_lanes(mv);
      if (a.acc_in) load_lanes(accv, acc + i, vec, lanes); else zero_lanes(accv);
      if (a.avg_in) load_lanes(avgv, avg + i, vec, lanes); else zero_lanes(avgv);
      FASTSGD_UNROLL
      for (int j = 0; j < kILP; ++j) Op::element(wv[j], gv[j], mv[j], accv[j], avgv[j], k, t.flags);
      if (a.w_out) store_lanes(w + i, wv, vec, lanes);
      if (a.m_out) store_lanes(m + i, mv, vec, lanes);
      if (a.acc_out) store_lanes(acc + i, accv, vec, lanes);
      if (a.avg_out) store_lanes(avg + i, avgv, vec, lanes);
    }
  }
};

// ---- norm clipping: sum of squares of the effective gradient --------------------------------
//
// Stage 1 (multi_tensor_reduce_kernel): one partial per chunk, each thread accumulating its
//   lanes in double in a fixed order, then the block's fixed tree.
// Stage 2 (TensorNormStage, one block per tensor of a stage-1 launch): the tensor's chunk
//   partials summed in index order -> its sum of squares; clipnorm turns it into that
//   tensor's (clip_mul, clip_div) with math::clipnorm_coeffs.
// Stage 3 (GlobalNormStage, one block, global_clipnorm only): the tensors' sums in tensor
//   order -> math::global_clip_scale -> row 0 of the clip table.
// No atomics and no host synchronisation: the update launches read the clip table.

template <class W, class S, bool Merge>
struct SumSquaresFunctor {
  using C = typename compute_type<W>::type;

  static FASTSGD_HD double thread_sum(const LaunchMeta& meta, int64_t b, int tid, const StepScalars& s) {
    const ChunkRef c = locate_chunk(meta, b);
    const TensorMeta& t = meta.tensors[c.tensor];
    const math::Coeffs<C> k = math::make_coeffs<C>(s, TensorScalars{});
    const W* g = at<const W>(t.ptr[kG], c.begin);
    const S* acc = at<const S>(t.ptr[kAcc], c.begin);
    const bool aligned = (t.flags & kAligned) != 0;
    double lane[kILP] = {};
    for (int i = tid * kILP; i < c.n; i += kBlockThreads * kILP) {
      const int lanes = c.n - i < kILP ? c.n - i : kILP;
      const bool vec = aligned && lanes == kILP;
      C gv[kILP], accv[kILP];
      load_lanes(gv, g + i, vec, lanes);
      if (Merge) load_lanes(accv, acc + i, vec, lanes); else zero_lanes(accv);
      FASTSGD_UNROLL
      for (int j = 0; j < kILP; ++j) {
        if (j < lanes) {
          const double x = double(math::effective_grad<C, Merge>(gv[j], accv[j], k));
          lane[j] += x * x;
        }
      }
    }
    return (lane[0] + lane[1]) + (lane[2] + lane[3]);
  }
};

struct TensorNormStage {
  // Thread tid's share of the chunk partials of tensor b of a stage-1 launch.
  static FASTSGD_HD double thread_sum(const LaunchMeta& meta, int b, int tid, const double* partials) {
    const int64_t first = meta.partial_base + meta.chunk_start[b];
    return strided_sum(partials + first, int64_t(meta.chunk_start[b + 1]) - meta.chunk_start[b], tid);
  }
  static FASTSGD_HD void finish(const LaunchMeta& meta, int b, double sum, bool per_tensor, double clipnorm,
                                double* sums, double* clip) {
    const int64_t row = meta.tensors[b].aux;
    sums[row] = sum;
    if (per_tensor) math::clipnorm_coeffs<double>(sum, clipnorm, clip[2 * row], clip[2 * row + 1]);
  }
};

struct GlobalNormStage {
  static FASTSGD_HD double thread_sum(int32_t n, int tid, const double* sums) { return strided_sum(sums, n, tid); }
  static FASTSGD_HD void finish(double sum, double clipnorm, double* clip) {
    clip[0] = math::global_clip_scale<double>(sum, clipnorm);
    clip[1] = 1.0;
  }
};

// ---- host: runtime choices -> one functor type ----------------------------------------------

template <class T>
struct Tag {
  using type = T;
};

template <class W, class S, MomentumKind MK, class V>
void visit_update(const PassVariant& v, V&& vis) {
  using C = typename compute_type<W>::type;
  if (v.merge) {
    if (v.ema) vis(Tag<SgdFunctor<W, S, UpdateOp<C, MK, true, true>>>{});
    else vis(Tag<SgdFunctor<W, S, UpdateOp<C, MK, true, false>>>{});
  } else {
    if (v.ema) vis(Tag<SgdFunctor<W, S, UpdateOp<C, MK, false, true>>>{});
    else vis(Tag<SgdFunctor<W, S, UpdateOp<C, MK, false, false>>>{});
  }
}

// Calls vis(Tag<Functor>{}) with the pass functor of variant v for storage (W, S).
template <class W, class S, class V>
void visit_pass(const PassVariant& v, V&& vis) {
  using C = typename compute_type<W>::type;
  switch (v.kind) {
    case PassKind::accumulate:
      if (v.ema) vis(Tag<SgdFunctor<W, S, AccumulateOp<C, true>>>{});
      else vis(Tag<SgdFunctor<W, S, AccumulateOp<C, false>>>{});
      return;
    case PassKind::idle: vis(Tag<SgdFunctor<W, S, IdleOp<C>>>{}); return;
    case PassKind::finalize: vis(Tag<SgdFunctor<W, S, FinalizeOp<C>>>{}); return;
    case PassKind::update: break;
  }
  switch (v.momentum) {
    case MomentumKind::heavy_ball: visit_update<W, S, MomentumKind::heavy_ball>(v, vis); return;
    case MomentumKind::nesterov: visit_update<W, S, MomentumKind::nesterov>(v, vis); return;
    case MomentumKind::none: break;
  }
  visit_update<W, S, MomentumKind::none>(v, vis);
}

template <class W, class S, class V>
void visit_sum_squares(bool merge, V&& vis) {
  if (merge) vis(Tag<SumSquaresFunctor<W, S, true>>{});
  else vis(Tag<SumSquaresFunctor<W, S, false>>{});
}

// Calls vis(Tag<W>{}, Tag<S>{}) for a storage combination (host tests; the CUDA build has
// one translation unit per combination instead).
template <class V>
void visit_combo(Combo c, V&& vis) {
  switch (c) {
    case Combo::f32: vis(Tag<float>{}, Tag<float>{}); return;
    case Combo::f64: vis(Tag<double>{}, Tag<double>{}); return;
    case Combo::f16_f32: vis(Tag<half_t>{}, Tag<float>{}); return;
    case Combo::f16_f16: vis(Tag<half_t>{}, Tag<half_t>{}); return;
    case Combo::bf16_f32: vis(Tag<bfloat16_t>{}, Tag<float>{}); return;
    case Combo::bf16_bf16: vis(Tag<bfloat16_t>{}, Tag<bfloat16_t>{}); return;
  }
}

}  // namespace FASTSGD_ISA_NS
}  // namespace gpu
}  // namespace fastsgd
