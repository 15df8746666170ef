// A scalar restatement of one fastsgd::SGD step, for the native tests: the order of
// operations spelled out one element at a time, in plain loops. The Keras stages that 0.1
// already pinned (unscale, window merge, clips, decoupled decay, Keras momentum, EMA) call
// math.h's per-element functions; the rules 0.2 added (maximize, L2 decay, torch's momentum
// buffer with b = g on a slot's first step, dampening, torch's Nesterov and step, all with
// explicit fma) are written out here independently of math.h, from torch.optim.SGD's
// _single_tensor_sgd. The CPU walks (every ISA level, any thread count) must reproduce it bit
// for bit.
//
// Norm clipping measures gradients in double, and the engine promises a result that does not
// depend on the thread count or the ISA level; that fixes the order of the sum, which this
// reference restates: per tensor, blocks of 8192 elements counted from the tensor's start;
// inside a block 16 partial sums (element i goes to lane (i - block start) % 16), folded
// pairwise (lane j += lane j + 8, then + 4, + 2, + 1); block sums added in order; for
// global_clipnorm the tensor sums added in variable order. Change the engine's order and this
// file changes with it.
//
// skip_nonfinite: a step whose effective gradients (unscaled, window-merged) hold an Inf or
// NaN anywhere changes nothing and only counts in `skipped`.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "fastsgd/fastsgd.h"

namespace ref {

using fastsgd::bfloat16_t;
using fastsgd::Convention;
using fastsgd::DecayForm;
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
  Convention rule = Convention::keras;
  MomentumKind momentum = MomentumKind::none;
  bool merge = false, clip = false, ema = false;
};

constexpr int64_t kNormBlock = 8192;
constexpr int kSumLanes = 16;

// A tensor's group hyper-parameters rounded to the compute type the way the engine rounds
// them: each value converted from double once; 1 - dampening subtracted in double first.
template <class C>
struct Rule {
  C lr, momentum, damp_take, wd;
  bool l2, maximize, fresh;
  explicit Rule(const TensorScalars& t)
      : lr(C(t.learning_rate)), momentum(C(t.momentum)), damp_take(C(1.0 - t.dampening)),
        wd(C(t.weight_decay)), l2(t.decay_l2), maximize(t.maximize), fresh(t.fresh_momentum) {}
};

// One element of an update call, in the order of both conventions:
//   unscale -> window merge -> norm clip -> value clip -> maximize -> decay -> rule -> EMA.
template <class C, bool Merge, bool Clip, bool Ema>
void update_element(C& w, C g, C& m, C& acc, C& avg, const math::Coeffs<C>& k, const Rule<C>& r,
                    Convention rule, MomentumKind mk) {
  g = math::unscale(g, k);
  if (Merge) {
    g = math::window_mean(g, acc, k);
    acc = C(0);
  }
  if (Clip) g = math::clip_by_norm(g, k);
  g = math::clip_by_value(g, k);
  if (r.maximize) g = -g;
  if (r.wd != C(0)) {
    if (r.l2) g = std::fma(w, r.wd, g);  // torch: grad.add(param, alpha=weight_decay)
    else w = math::weight_decay(w, k);
  }
  if (rule == Convention::keras) {
    if (mk == MomentumKind::none) {
      w = math::plain_step(w, g, k);
    } else {
      m = math::velocity(m, g, k);
      w = mk == MomentumKind::nesterov ? math::nesterov_step(w, g, m, k) : w + m;
    }
  } else {
    // torch: buf = grad on the first step, else buf.mul_(momentum).add_(grad, alpha=1 - dampening);
    // nesterov: grad.add(buf, alpha=momentum); param.add_(grad, alpha=-lr)
    C u = g;
    if (mk != MomentumKind::none) {
      m = r.fresh ? g : std::fma(g, r.damp_take, m * r.momentum);
      u = mk == MomentumKind::nesterov ? std::fma(m, r.momentum, g) : m;
    }
    w = std::fma(u, -r.lr, w);
  }
  if (Ema) {
    avg = math::ema(avg, w, k);
    if (k.ema_overwrite) w = avg;
  }
}

// One variable with its gradient and slots, type-erased so an optimizer can mix dtypes.
struct Var {
  virtual ~Var() = default;
  bool has_grad = true;
  bool decays = true;
  bool started = false;  // torch convention: the momentum slot has had its first step
  TensorScalars ts;
  virtual int64_t numel() const = 0;
  virtual double sum_squares(const StepScalars& s, bool merge) const = 0;
  virtual bool nonfinite(const StepScalars& s, bool merge) const = 0;
  virtual void pass(PassKind kind, const StepScalars& s, const Features& f) = 0;
};

inline bool accumulating(const Options& o) { return o.gradient_accumulation_steps.value_or(0) >= 2; }
inline double positive_or_zero(const std::optional<double>& v) { return v && *v > 0 ? *v : 0.0; }

template <class W, class S>
struct TypedVar final : Var {
  using C = typename fastsgd::compute_type<W>::type;
  std::vector<W> w, g;
  std::vector<S> m, avg, acc;  // empty when the optimizer has no such slot

  TypedVar(const Options& o, int64_t n) : w(size_t(n)), g(size_t(n)) {
    if (o.group.momentum != 0.0) m.assign(size_t(n), S{});
    if (o.use_ema) avg.assign(size_t(n), S{});
    if (accumulating(o)) acc.assign(size_t(n), S{});
  }
  int64_t numel() const override { return int64_t(w.size()); }

  C effective(const math::Coeffs<C>& k, bool merge, size_t i) const {
    using fastsgd::load;
    const C a = merge ? load<C>(acc[i]) : C(0);
    return merge ? math::effective_grad<C, true>(load<C>(g[i]), a, k)
                 : math::effective_grad<C, false>(load<C>(g[i]), a, k);
  }

  double sum_squares(const StepScalars& s, bool merge) const override {
    const math::Coeffs<C> k = math::make_coeffs<C>(s, TensorScalars{});
    double total = 0.0;
    const int64_t n = numel();
    for (int64_t b = 0; b < n; b += kNormBlock) {
      double lanes[kSumLanes] = {};
      const int64_t end = std::min(n, b + kNormBlock);
      for (int64_t i = b; i < end; ++i) {
        const double x = double(effective(k, merge, size_t(i)));
        lanes[(i - b) % kSumLanes] += x * x;
      }
      for (int width = kSumLanes / 2; width > 0; width /= 2)
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
      total += lanes[0];
    }
    return total;
  }

  bool nonfinite(const StepScalars& s, bool merge) const override {
    const math::Coeffs<C> k = math::make_coeffs<C>(s, TensorScalars{});
    for (size_t i = 0; i < w.size(); ++i)
      if (!std::isfinite(double(effective(k, merge, i)))) return true;
    return false;
  }

  template <bool Merge, bool Clip, bool Ema>
  void update(const math::Coeffs<C>& k, const Features& f) {
    using fastsgd::load;
    using fastsgd::store;
    const Rule<C> r(ts);
    const bool has_m = f.momentum != MomentumKind::none;
    for (size_t i = 0; i < w.size(); ++i) {
      C wv = load<C>(w[i]);
      C mv = has_m ? load<C>(m[i]) : C(0);
      C av = Merge ? load<C>(acc[i]) : C(0);
      C ev = Ema ? load<C>(avg[i]) : C(0);
      update_element<C, Merge, Clip, Ema>(wv, load<C>(g[i]), mv, av, ev, k, r, f.rule, f.momentum);
      store(w[i], wv);
      if (has_m) store(m[i], mv);
      if (Merge) store(acc[i], av);
      if (Ema) store(avg[i], ev);
    }
  }
  template <bool Merge, bool Clip>
  void update_e(const Features& f, const math::Coeffs<C>& k) {
    f.ema ? update<Merge, Clip, true>(k, f) : update<Merge, Clip, false>(k, f);
  }
  template <bool Merge>
  void update_c(const Features& f, const math::Coeffs<C>& k) {
    f.clip ? update_e<Merge, true>(f, k) : update_e<Merge, false>(f, k);
  }

  void pass(PassKind kind, const StepScalars& s, const Features& f) override {
    using fastsgd::load;
    using fastsgd::store;
    const math::Coeffs<C> k = math::make_coeffs<C>(s, ts);
    switch (kind) {
      case PassKind::update:
        f.merge ? update_c<true>(f, k) : update_c<false>(f, k);
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

// The optimizer, one parameter group (Options::group): sgd.cpp's step, restated.
struct SGD {
  Options o;
  int64_t raw = 0;
  int64_t skipped = 0;
  std::vector<std::unique_ptr<Var>> vars;

  explicit SGD(const Options& options) : o(options) {}

  template <class W, class S>
  TypedVar<W, S>& add(int64_t n) {
    vars.emplace_back(new TypedVar<W, S>(o, n));
    return static_cast<TypedVar<W, S>&>(*vars.back());
  }

  int64_t iterations() const {
    const int64_t k = o.gradient_accumulation_steps.value_or(0);
    return k >= 2 ? raw / k : raw;
  }

  // One step; returns false when skip_nonfinite skipped it.
  bool step(double learning_rate, double grad_scale = 1.0) {
    const int64_t k = o.gradient_accumulation_steps.value_or(0);
    const bool accumulating = k >= 2;
    const bool update_call = !accumulating || (raw + 1) % k == 0;
    const bool touches_all = o.use_ema || (accumulating && update_call);
    const fastsgd::Group& grp = o.group;
    StepScalars s;
    s.grad_scale = (o.loss_scale_factor ? 1.0 / *o.loss_scale_factor : 1.0) * grad_scale;
    s.window = (accumulating && update_call) ? double(k) : 1.0;
    s.clip_value = positive_or_zero(o.clipvalue);
    const int64_t it = iterations();
    s.ema_keep = (o.use_ema && it != 0) ? o.ema_momentum : 0.0;
    s.merge_window = accumulating && update_call;
    s.reset_accumulator = accumulating && update_call;
    const int64_t every = o.ema_overwrite_frequency.value_or(0);
    s.ema_overwrite = o.use_ema && every > 0 && (it + 1) % every == 0;

    Features f;
    f.rule = o.convention;
    f.momentum = grp.momentum == 0.0 ? MomentumKind::none
                 : grp.nesterov      ? MomentumKind::nesterov
                                     : MomentumKind::heavy_ball;
    f.merge = s.merge_window;
    f.ema = o.use_ema;
    const double clipnorm = positive_or_zero(o.clipnorm), global_clipnorm = positive_or_zero(o.global_clipnorm);
    f.clip = update_call && (clipnorm > 0 || global_clipnorm > 0);

    if (o.skip_nonfinite) {
      for (auto& v : vars)
        if (v->has_grad && v->numel() > 0 && v->nonfinite(s, f.merge)) {
          ++skipped;
          return false;
        }
    }

    const DecayForm form = grp.decay_form ? *grp.decay_form
                           : o.convention == Convention::torch ? DecayForm::l2
                                                               : DecayForm::decoupled;
    for (auto& v : vars) {
      TensorScalars& t = v->ts;
      t = TensorScalars{};
      t.learning_rate = update_call ? learning_rate : 0.0;
      t.momentum = grp.momentum;
      t.dampening = grp.dampening;
      t.weight_decay = v->decays ? grp.weight_decay : 0.0;
      t.decay_l2 = form == DecayForm::l2;
      t.maximize = grp.maximize;
      t.fresh_momentum = o.convention == Convention::torch && f.momentum != MomentumKind::none && !v->started;
    }
    if (f.clip) {
      if (clipnorm > 0) {
        for (auto& v : vars)
          if (v->has_grad && v->numel() > 0)
            math::clipnorm_coeffs<double>(v->sum_squares(s, f.merge), clipnorm, v->ts.clip_mul, v->ts.clip_div);
      } else {
        double sum = 0.0;
        for (auto& v : vars)
          if (v->has_grad && v->numel() > 0) sum += v->sum_squares(s, f.merge);
        const double scale = math::global_clip_scale<double>(sum, global_clipnorm);
        for (auto& v : vars) {
          v->ts.clip_mul = scale;
          v->ts.clip_div = 1.0;
        }
      }
    }
    for (auto& v : vars) {
      if (v->numel() == 0) continue;
      if (v->has_grad) {
        v->pass(update_call ? PassKind::update : PassKind::accumulate, s, f);
        if (update_call && f.momentum != MomentumKind::none) v->started = true;
      } else if (touches_all) {
        v->pass(PassKind::idle, s, f);
      }
    }
    ++raw;
    return true;
  }

  void finalize() {
    if (!o.use_ema) return;
    for (auto& v : vars) v->pass(PassKind::finalize, StepScalars{}, Features{});
  }
};

}  // namespace ref
