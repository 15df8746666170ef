// A scalar restatement of one fastsgd::SGD step, for the native tests: Keras's order of
// operations spelled out with nothing but math.h's per-element functions and dtype.h's
// load/store, one element at a time, in plain loops. The CPU walks (every ISA level, any
// thread count) must reproduce it bit for bit.
//
// Norm clipping measures gradients in double, and the engine promises a result that does not
// depend on the thread count or the ISA level; that fixes the order of the sum, which this
// reference restates: per tensor, blocks of 8192 elements counted from the tensor's start;
// inside a block 16 partial sums (element i goes to lane (i - block start) % 16), folded
// pairwise (lane j += lane j + 8, then + 4, + 2, + 1); block sums added in order; for
// global_clipnorm the tensor sums added in variable order. Change the engine's order and this
// file changes with it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "fastsgd/fastsgd.h"

namespace ref {

using fastsgd::bfloat16_t;
using fastsgd::DType;
using fastsgd::half_t;
using fastsgd::MomentumKind;
using fastsgd::Options;
using fastsgd::PassKind;
using fastsgd::StepScalars;
using fastsgd::TensorScalars;
namespace math = fastsgd::math;

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::float32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::float64; };
template <> struct dtype_of<half_t> { static constexpr DType value = DType::float16; };
template <> struct dtype_of<bfloat16_t> { static constexpr DType value = DType::bfloat16; };

template <class T> const char* type_name() {
  return fastsgd::dtype_name(dtype_of<T>::value);
}

// Same value: equal bits, or both NaN (a NaN's payload may legitimately depend on operand
// order, which vector code may swap for commutative operations).
template <class T> bool same(const T& a, const T& b) {
  if (std::memcmp(&a, &b, sizeof(T)) == 0) return true;
  using fastsgd::load;
  return std::isnan(load<double>(a)) && std::isnan(load<double>(b));
}

struct Features {
  MomentumKind momentum = MomentumKind::none;
  bool merge = false, clip = false, ema = false;
};

constexpr int64_t kNormBlock = 8192;
constexpr int kSumLanes = 16;

// One variable with its gradient and slots, type-erased so an optimizer can mix dtypes.
struct Var {
  virtual ~Var() = default;
  bool has_grad = true;
  bool decays = true;
  TensorScalars ts;
  virtual int64_t numel() const = 0;
  virtual double sum_squares(const StepScalars& s, bool merge) const = 0;
  virtual void pass(PassKind kind, const StepScalars& s, const Features& f) = 0;
};

template <class W, class S>
struct TypedVar final : Var {
  using C = typename fastsgd::compute_type<W>::type;
  std::vector<W> w, g;
  std::vector<S> m, avg, acc;  // empty when the optimizer has no such slot

  TypedVar(const Options& o, int64_t n) : w(size_t(n)), g(size_t(n)) {
    if (o.momentum != 0.0) m.assign(size_t(n), S{});
    if (o.use_ema) avg.assign(size_t(n), S{});
    if (o.gradient_accumulation_steps >= 2) acc.assign(size_t(n), S{});
  }
  int64_t numel() const override { return int64_t(w.size()); }

  double sum_squares(const StepScalars& s, bool merge) const override {
    using fastsgd::load;
    TensorScalars plain;
    const math::Coeffs<C> k = math::make_coeffs<C>(s, plain);
    double total = 0.0;
    const int64_t n = numel();
    for (int64_t b = 0; b < n; b += kNormBlock) {
      double lanes[kSumLanes] = {};
      const int64_t end = std::min(n, b + kNormBlock);
      for (int64_t i = b; i < end; ++i) {
        const C a = merge ? load<C>(acc[size_t(i)]) : C(0);
        const double x = merge ? double(math::effective_grad<C, true>(load<C>(g[size_t(i)]), a, k))
                               : double(math::effective_grad<C, false>(load<C>(g[size_t(i)]), a, k));
        lanes[(i - b) % kSumLanes] += x * x;
      }
      for (int width = kSumLanes / 2; width > 0; width /= 2)
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
      total += lanes[0];
    }
    return total;
  }

  template <MomentumKind MK, bool Merge, bool Clip, bool Ema>
  void update(const math::Coeffs<C>& k) {
    using fastsgd::load;
    using fastsgd::store;
    for (size_t i = 0; i < w.size(); ++i) {
      C wv = load<C>(w[i]);
      C mv = MK != MomentumKind::none ? load<C>(m[i]) : C(0);
      C av = Merge ? load<C>(acc[i]) : C(0);
      C ev = Ema ? load<C>(avg[i]) : C(0);
      math::update<C, MK, Merge, Clip, Ema>(wv, load<C>(g[i]), mv, av, ev, k);
      store(w[i], wv);
      if (MK != MomentumKind::none) store(m[i], mv);
      if (Merge) store(acc[i], av);
      if (Ema) store(avg[i], ev);
    }
  }
  template <MomentumKind MK, bool Merge, bool Clip>
  void update_e(const Features& f, const math::Coeffs<C>& k) {
    f.ema ? update<MK, Merge, Clip, true>(k) : update<MK, Merge, Clip, false>(k);
  }
  template <MomentumKind MK, bool Merge>
  void update_c(const Features& f, const math::Coeffs<C>& k) {
    f.clip ? update_e<MK, Merge, true>(f, k) : update_e<MK, Merge, false>(f, k);
  }
  template <MomentumKind MK>
  void update_m(const Features& f, const math::Coeffs<C>& k) {
    f.merge ? update_c<MK, true>(f, k) : update_c<MK, false>(f, k);
  }

  void pass(PassKind kind, const StepScalars& s, const Features& f) override {
    using fastsgd::load;
    using fastsgd::store;
    TensorScalars t = ts;
    t.decays = decays;
    const math::Coeffs<C> k = math::make_coeffs<C>(s, t);
    switch (kind) {
      case PassKind::update:
        if (f.momentum == MomentumKind::heavy_ball) update_m<MomentumKind::heavy_ball>(f, k);
        else if (f.momentum == MomentumKind::nesterov) update_m<MomentumKind::nesterov>(f, k);
        else update_m<MomentumKind::none>(f, k);
        break;
      case PassKind::accumulate:
        for (size_t i = 0; i < w.size(); ++i) {
          C wv = load<C>(w[i]), av = load<C>(acc[i]), ev = f.ema ? load<C>(avg[i]) : C(0);
          if (f.ema) {
            math::accumulate_only<C, true>(wv, load<C>(g[i]), av, ev, k);
            store(w[i], wv);
            store(avg[i], ev);
          } else {
            math::accumulate_only<C, false>(wv, load<C>(g[i]), av, ev, k);
          }
          store(acc[i], av);
        }
        break;
      case PassKind::idle:
        if (!avg.empty()) {
          for (size_t i = 0; i < w.size(); ++i) {
            C wv = load<C>(w[i]), ev = load<C>(avg[i]);
            math::ema_only(wv, ev, k);
            store(w[i], wv);
            store(avg[i], ev);
          }
        }
        if (s.reset_accumulator && !acc.empty())
          for (auto& a : acc) store(a, C(0));
        break;
      case PassKind::finalize:
        for (size_t i = 0; i < w.size(); ++i) {
          C wv;
          math::take_average(wv, load<C>(avg[i]));
          store(w[i], wv);
        }
        break;
    }
  }
};

// The optimizer: Keras's apply() (sgd.cpp's step, restated).
struct SGD {
  Options o;
  int64_t raw = 0;
  std::vector<std::unique_ptr<Var>> vars;

  explicit SGD(const Options& options) : o(options) {}

  template <class W, class S>
  TypedVar<W, S>& add(int64_t n) {
    vars.emplace_back(new TypedVar<W, S>(o, n));
    return static_cast<TypedVar<W, S>&>(*vars.back());
  }

  int64_t iterations() const {
    const int64_t k = o.gradient_accumulation_steps;
    return k >= 2 ? raw / k : raw;
  }

  void step(double learning_rate) {
    const int64_t k = o.gradient_accumulation_steps;
    const bool accumulating = k >= 2;
    const bool update_call = !accumulating || (raw + 1) % k == 0;
    const bool touches_all = o.use_ema || (accumulating && update_call);
    StepScalars s;
    s.learning_rate = update_call ? learning_rate : 0.0;
    s.momentum = o.momentum;
    s.grad_scale = o.loss_scale_factor > 0 ? 1.0 / o.loss_scale_factor : 1.0;
    s.window = (accumulating && update_call) ? double(k) : 1.0;
    s.weight_decay = o.weight_decay;
    s.clip_value = o.clipvalue;
    const int64_t it = iterations();
    s.ema_keep = (o.use_ema && it != 0) ? o.ema_momentum : 0.0;
    s.merge_window = accumulating && update_call;
    s.reset_accumulator = accumulating && update_call;
    s.ema_overwrite = o.use_ema && o.ema_overwrite_frequency > 0 && (it + 1) % o.ema_overwrite_frequency == 0;

    Features f;
    f.momentum = o.momentum == 0.0 ? MomentumKind::none
                 : o.nesterov      ? MomentumKind::nesterov
                                   : MomentumKind::heavy_ball;
    f.merge = s.merge_window;
    f.ema = o.use_ema;
    f.clip = update_call && (o.clipnorm > 0 || o.global_clipnorm > 0);

    for (auto& v : vars) v->ts = TensorScalars{};
    if (f.clip) {
      if (o.clipnorm > 0) {
        for (auto& v : vars)
          if (v->has_grad && v->numel() > 0)
            math::clipnorm_coeffs<double>(v->sum_squares(s, f.merge), o.clipnorm, v->ts.clip_mul,
                                          v->ts.clip_div);
      } else {
        double sum = 0.0;
        for (auto& v : vars)
          if (v->has_grad && v->numel() > 0) sum += v->sum_squares(s, f.merge);
        const double scale = math::global_clip_scale<double>(sum, o.global_clipnorm);
        for (auto& v : vars) {
          v->ts.clip_mul = scale;
          v->ts.clip_div = 1.0;
        }
      }
    }
    for (auto& v : vars) {
      if (v->numel() == 0) continue;
      if (v->has_grad) v->pass(update_call ? PassKind::update : PassKind::accumulate, s, f);
      else if (touches_all) v->pass(PassKind::idle, s, f);
    }
    ++raw;
  }

  void finalize() {
    if (!o.use_ema) return;
    for (auto& v : vars) v->pass(PassKind::finalize, StepScalars{}, Features{});
  }
};

}  // namespace ref
