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
//   ptr[kMaster] float32 master (float) or remainder (uint16_t)   16-bit update passes with
//                                                                 master_weights
// TensorMeta::scalars  the tensor's TensorScalars (its group's learning rate, momentum,
//                    dampening, weight decay, and clip coefficients computed on the host),
//                    indexed by kLr .. kClipDiv.
// TensorMeta::aux    row of the device clip table, whose (clip_mul, clip_div) then replace the
//                    host values; -1 when the coefficients are in `scalars`. In
//                    sum-of-squares launches: the tensor's row of the norm tables.
// TensorMeta::flags  kDecayL2, kMaximize, kFreshMomentum (TensorScalars' booleans),
//                    kHasAvg, kResetAcc (idle passes), and kStochastic (16-bit update passes
//                    that round the stored variable stochastically).
// TensorMeta::word   the tensor's random stream (TensorScalars::random_stream).
//
// Storage combinations (W, S), exactly as the CPU's select_pass (cpp/src/cpu/walk.inc):
//   (float, float) (double, double) (half_t, float) (half_t, half_t)
//   (bfloat16_t, float) (bfloat16_t, bfloat16_t); math in float, or double for double.
//
// Instantiations are kept lean for compile time: the pass kind, the rule (Keras or torch),
// the momentum kind, window merging and EMA change what is read and written or which formula
// runs, and are template parameters. Everything else is an identity when off and is always
// applied, which gives the same bits as the CPU's instantiations that skip it:
//   norm clip   (g * 1) / 1 == g
//   unscale     g * 1 == g;  clip-by-value with bounds (-inf, inf) returns g (NaN included)
//   decay       a tensor without weight decay takes the decoupled form, w * 1 == w (the L2
//               form fma(w, 0, g) is not an identity for w = inf or g = -0, so kDecayL2 is
//               only set when the weight decay is nonzero).
//
// 16-bit variables with master_weights or stochastic_rounding (math.h, "16-bit storage") run
// LowpUpdateFunctor, the per-element loop of the CPU's lowp_update_pass: the same math.h calls
// in the same order, and element i of a tensor draws its bits from segment_key(stream, i) with
// counter uint32_t(i), so the bits do not depend on the block or thread that owns i. Its form
// (plain, master, remainder) is a template parameter, instantiated only where the CPU has it
// (masters with float32 slots, remainders for bfloat16 variables); whether a master or a
// remainder rounds stochastically is the per-tensor kStochastic flag, a uniform branch.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fastsgd/dtype.h"
#include "fastsgd/math.h"
#include "fastsgd/step.h"
#include "multi_tensor_apply.cuh"

namespace fastsgd {
namespace gpu {

enum : int { kW = 0, kG = 1, kM = 2, kAcc = 3, kAvg = 4, kMaster = 5 };
static_assert(kMaster < kSlots, "TensorMeta holds every buffer of a task");

// TensorMeta::scalars of SGD launches.
enum : int { kLr = 0, kMomentum = 1, kDampening = 2, kWeightDecay = 3, kClipMul = 4, kClipDiv = 5 };
static_assert(kClipDiv < kTensorScalars, "TensorMeta holds every per-tensor scalar");

// TensorMeta::flags bits of SGD launches (bit 0 is the walk's kAligned).
constexpr uint32_t kDecayL2 = 2u;
constexpr uint32_t kHasAvg = 4u;
constexpr uint32_t kResetAcc = 8u;
constexpr uint32_t kMaximize = 16u;
constexpr uint32_t kFreshMomentum = 32u;
constexpr uint32_t kNarrowNorm = 64u;  // norm launches: the tensor computes in float32 (see keras_sum_squares)
constexpr uint32_t kStochastic = 128u;

// Which functor an update pass of a 16-bit variable runs: the common one (none: stored to
// nearest, no master), or LowpUpdateFunctor with the variable alone rounded stochastically
// (plain), beside a float32 master, or joined with a remainder.
enum class Lowp : int32_t { none = 0, plain = 1, master = 2, remainder = 3 };
constexpr int kNumLowp = 4;

enum class Combo : int32_t { f32 = 0, f64 = 1, f16_f32 = 2, f16_f16 = 3, bf16_f32 = 4, bf16_bf16 = 5 };
constexpr int kNumCombos = 6;

// What one pass launch runs: the pass kind and the step-wide features that are compiled in.
struct PassVariant {
  PassKind kind = PassKind::update;
  Convention rule = Convention::keras;
  MomentumKind momentum = MomentumKind::none;
  bool merge = false;
  bool ema = false;
  Lowp lowp = Lowp::none;  // update passes only
};

// The per-tensor half of a TensorMeta of an SGD launch, from a task's TensorScalars.
inline void pack_tensor_scalars(const TensorScalars& ts, double (&out)[kTensorScalars], uint32_t& flags) {
  out[kLr] = ts.learning_rate;
  out[kMomentum] = ts.momentum;
  out[kDampening] = ts.dampening;
  out[kWeightDecay] = ts.weight_decay;
  out[kClipMul] = ts.clip_mul;
  out[kClipDiv] = ts.clip_div;
  if (ts.decay_l2 && ts.weight_decay != 0.0) flags |= kDecayL2;
  if (ts.maximize) flags |= kMaximize;
  if (ts.fresh_momentum) flags |= kFreshMomentum;
}

inline namespace FASTSGD_ISA_NS {

// The inverse of pack_tensor_scalars, with the device clip table's row when aux >= 0.
FASTSGD_HD TensorScalars unpack_tensor_scalars(const TensorMeta& t, const double* clip) {
  TensorScalars ts;
  ts.learning_rate = t.scalars[kLr];
  ts.momentum = t.scalars[kMomentum];
  ts.dampening = t.scalars[kDampening];
  ts.weight_decay = t.scalars[kWeightDecay];
  ts.clip_mul = t.scalars[kClipMul];
  ts.clip_div = t.scalars[kClipDiv];
  if (t.aux >= 0 && clip) {
    ts.clip_mul = clip[2 * int64_t(t.aux)];
    ts.clip_div = clip[2 * int64_t(t.aux) + 1];
  }
  ts.decay_l2 = (t.flags & kDecayL2) != 0;
  ts.maximize = (t.flags & kMaximize) != 0;
  ts.fresh_momentum = (t.flags & kFreshMomentum) != 0;
  ts.random_stream = t.word;
  return ts;
}

// Which buffers an op reads and writes.
struct Access {
  bool w_in, g_in, m_in, acc_in, avg_in;
  bool w_out, m_out, acc_out, avg_out;
};

// ---- the element ops: registers in, registers out, math.h only ------------------------------

template <class C, Convention R, MomentumKind MK, bool Merge, bool Ema>
struct UpdateOp {
  static constexpr bool kMom = MK != MomentumKind::none;
  static FASTSGD_HD Access access(uint32_t) {
    return {true, true, kMom, Merge, Ema, true, kMom, Merge, Ema};
  }
  static FASTSGD_HD void element(C& w, C g, C& m, C& acc, C& avg, const math::Coeffs<C>& k, uint32_t) {
    math::update<C, R, MK, Merge, /*NormClip=*/true, Ema>(w, g, m, acc, avg, k);
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
    const math::Coeffs<C> k = math::make_coeffs<C>(s, unpack_tensor_scalars(t, clip));
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

// ---- the update of a 16-bit variable with a master form or stochastic rounding ----------------

// W: bfloat16_t or half_t; S: the slot type (float, or W itself for Form plain).
template <class W, class S, Convention R, MomentumKind MK, bool Merge, Lowp Form>
struct LowpUpdateFunctor {
  static_assert(Form != Lowp::none, "the common functor handles variables without a master or rounding");
  static constexpr bool kMom = MK != MomentumKind::none;
  using MasterT = typename std::conditional<Form == Lowp::remainder, uint16_t, float>::type;

  static FASTSGD_HD void block(const LaunchMeta& meta, int64_t b, int tid, const StepScalars& s,
                               const double* clip) {
    const ChunkRef c = locate_chunk(meta, b);
    const TensorMeta& t = meta.tensors[c.tensor];
    const TensorScalars ts = unpack_tensor_scalars(t, clip);
    const math::Coeffs<float> k = math::make_coeffs<float>(s, ts);
    // A plain form exists only to round stochastically.
    const bool stochastic = Form == Lowp::plain || (t.flags & kStochastic) != 0;
    W* w = at<W>(t.ptr[kW], c.begin);
    const W* g = at<const W>(t.ptr[kG], c.begin);
    S* m = at<S>(t.ptr[kM], c.begin);
    S* acc = at<S>(t.ptr[kAcc], c.begin);
    MasterT* master = at<MasterT>(t.ptr[kMaster], c.begin);
    const bool aligned = (t.flags & kAligned) != 0;
    for (int i = tid * kILP; i < c.n; i += kBlockThreads * kILP) {
      const int lanes = c.n - i < kILP ? c.n - i : kILP;
      const bool vec = aligned && lanes == kILP;
      W wv[kILP];
      MasterT mas[kILP];
      float gv[kILP], mv[kILP], accv[kILP];
      if (Form != Lowp::master) load_raw_lanes(wv, w + i, vec, lanes);
      if (Form != Lowp::plain) load_raw_lanes(mas, master + i, vec, lanes);
      load_lanes(gv, g + i, vec, lanes);
      if (kMom) load_lanes(mv, m + i, vec, lanes); else zero_lanes(mv);
      if (Merge) load_lanes(accv, acc + i, vec, lanes); else zero_lanes(accv);
      FASTSGD_UNROLL
      for (int j = 0; j < kILP; ++j) {
        const int64_t e = c.begin + i + j;
        element(wv[j], mas[j], gv[j], mv[j], accv[j], k, stochastic, math::segment_key(ts.random_stream, e),
                uint32_t(e));
      }
      store_raw_lanes(w + i, wv, vec, lanes);
      if (Form != Lowp::plain) store_raw_lanes(master + i, mas, vec, lanes);
      if (kMom) store_lanes(m + i, mv, vec, lanes);
      if (Merge) store_lanes(acc + i, accv, vec, lanes);
    }
  }

  // lowp_update_pass's element (cpp/src/cpu/walk.inc) with key = segment_key(stream, i) and
  // counter j = uint32_t(i): the full gradient path, which on the CPU's shorter paths skips
  // only identities.
  static FASTSGD_HD void element(W& v, MasterT& mas, float g, float& m, float& acc, const math::Coeffs<float>& k,
                                 bool stochastic, uint32_t key, uint32_t j) {
    float wv;
    if constexpr (Form == Lowp::master) wv = mas;
    else if constexpr (Form == Lowp::remainder)
      wv = stochastic ? math::remainder_join<true>(v, mas, key, j) : math::remainder_join<false>(v, mas, key, j);
    else wv = load<float>(v);
    float avg = 0.0f;
    math::update<float, R, MK, Merge, /*NormClip=*/true, /*Ema=*/false>(wv, g, m, acc, avg, k);
    if constexpr (Form == Lowp::remainder) {
      if (stochastic) math::remainder_split<true>(wv, v, mas, key, j);
      else math::remainder_split<false>(wv, v, mas, key, j);
    } else {
      if constexpr (Form == Lowp::master) mas = wv;
      if (stochastic) math::store_rounded<true>(v, wv, math::random16(key, j));
      else math::store_rounded<false>(v, wv, 0u);
    }
  }
};

// ---- norm clipping and measuring: sums of squares of the effective gradient ----------------
//
// Stage 1 (multi_tensor_reduce_kernel): one Pair per chunk -- the sum of squares and a probe
//   sum of x * 0 (zero while every x is finite, NaN once one is Inf or NaN: exact, where the
//   sum of squares of finite float64 values may overflow) -- each thread accumulating its
//   lanes in double in a fixed order, then the block's fixed tree.
// Stage 2 (TensorNormStage, one block per tensor of a stage-1 launch): the tensor's chunk
//   Pairs summed in index order -> its row of the sums table; clipnorm turns the sum into
//   that tensor's (clip_mul, clip_div) with math::clipnorm_coeffs.
// Stage 3 (GlobalNormStage, one thread, global_clipnorm only): the rows summed one after
//   another in task order (as the engine's total) -> math::global_clip_scale -> row 0 of the
//   clip table.
// No atomics and no host synchronisation: the update launches read the clip table. The rows
// are what measure() copies to the host, so a step clipped with host-side coefficients from
// those sums gets the same bits as one clipped on the device.

template <class W, class S, bool Merge>
struct SumSquaresFunctor {
  using C = typename compute_type<W>::type;

  static FASTSGD_HD Pair thread_sum(const LaunchMeta& meta, int64_t b, int tid, const StepScalars& s) {
    const ChunkRef c = locate_chunk(meta, b);
    const TensorMeta& t = meta.tensors[c.tensor];
    const math::Coeffs<C> k = math::make_coeffs<C>(s, TensorScalars{});
    const W* g = at<const W>(t.ptr[kG], c.begin);
    const S* acc = at<const S>(t.ptr[kAcc], c.begin);
    const bool aligned = (t.flags & kAligned) != 0;
    double lane[kILP] = {}, probe[kILP] = {};
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
          probe[j] += x * 0.0;
        }
      }
    }
    return Pair{(lane[0] + lane[1]) + (lane[2] + lane[3]), (probe[0] + probe[1]) + (probe[2] + probe[3])};
  }
};

// Whether a probe sum saw an Inf or NaN.
FASTSGD_HD bool probe_nonfinite(double probe) { return probe != 0.0 || probe != probe; }

struct TensorNormStage {
  // Thread tid's share of the chunk partials of tensor b of a stage-1 launch.
  static FASTSGD_HD Pair thread_sum(const LaunchMeta& meta, int b, int tid, const Pair* partials) {
    const int64_t first = meta.partial_base + meta.chunk_start[b];
    return strided_sum(partials + first, int64_t(meta.chunk_start[b + 1]) - meta.chunk_start[b], tid);
  }
  static FASTSGD_HD void finish(const LaunchMeta& meta, int b, Pair sum, bool per_tensor, double clipnorm,
                                Pair* sums, double* clip) {
    const int64_t row = meta.tensors[b].aux;
    sums[row] = sum;
    if (per_tensor)
      math::clipnorm_coeffs<double>(math::keras_sum_squares(sum.a, (meta.tensors[b].flags & kNarrowNorm) != 0),
                                    clipnorm, clip[2 * row], clip[2 * row + 1]);
  }
};

struct GlobalNormStage {
  // The engine's total: rows added one after another, in task order.
  static FASTSGD_HD double total(int32_t rows, const Pair* sums) {
    double t = 0.0;
    for (int32_t r = 0; r < rows; ++r) t += sums[r].a;
    return t;
  }
  static FASTSGD_HD void finish(double sum, double clipnorm, bool narrow, double* clip) {
    clip[0] = math::global_clip_scale<double>(math::keras_sum_squares(sum, narrow), clipnorm);
    clip[1] = 1.0;
  }
};

// ---- host: runtime choices -> one functor type ----------------------------------------------

template <class T>
struct Tag {
  using type = T;
};

// The lowp forms the CPU instantiates for (W, S) (walk.inc's pick_lowp_form): a master
// only with float32 slots, a remainder only for bfloat16 variables; anything else rounds the
// plain variable stochastically, as there.
template <class W, class S, Convention R, MomentumKind MK, bool Merge, class V>
void visit_lowp(Lowp form, V&& vis) {
  if constexpr (std::is_same<S, float>::value) {
    if (form == Lowp::master) return vis(Tag<LowpUpdateFunctor<W, S, R, MK, Merge, Lowp::master>>{});
    if constexpr (std::is_same<W, bfloat16_t>::value) {
      if (form == Lowp::remainder) return vis(Tag<LowpUpdateFunctor<W, S, R, MK, Merge, Lowp::remainder>>{});
    }
  }
  vis(Tag<LowpUpdateFunctor<W, S, R, MK, Merge, Lowp::plain>>{});
}

template <class W, class S, Convention R, MomentumKind MK, class V>
void visit_update(const PassVariant& v, V&& vis) {
  using C = typename compute_type<W>::type;
  if constexpr (std::is_same<W, half_t>::value || std::is_same<W, bfloat16_t>::value) {
    // EMA is refused with master weights and stochastic rounding.
    if (v.lowp != Lowp::none) {
      if (v.merge) visit_lowp<W, S, R, MK, true>(v.lowp, vis);
      else visit_lowp<W, S, R, MK, false>(v.lowp, vis);
      return;
    }
  }
  if (v.merge) {
    if (v.ema) vis(Tag<SgdFunctor<W, S, UpdateOp<C, R, MK, true, true>>>{});
    else vis(Tag<SgdFunctor<W, S, UpdateOp<C, R, MK, true, false>>>{});
  } else {
    if (v.ema) vis(Tag<SgdFunctor<W, S, UpdateOp<C, R, MK, false, true>>>{});
    else vis(Tag<SgdFunctor<W, S, UpdateOp<C, R, MK, false, false>>>{});
  }
}

template <class W, class S, Convention R, class V>
void visit_momentum(const PassVariant& v, V&& vis) {
  switch (v.momentum) {
    case MomentumKind::heavy_ball: visit_update<W, S, R, MomentumKind::heavy_ball>(v, vis); return;
    case MomentumKind::nesterov: visit_update<W, S, R, MomentumKind::nesterov>(v, vis); return;
    case MomentumKind::none: break;
  }
  visit_update<W, S, R, MomentumKind::none>(v, vis);
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
  if (v.rule == Convention::torch) visit_momentum<W, S, Convention::torch>(v, vis);
  else visit_momentum<W, S, Convention::keras>(v, vis);
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
