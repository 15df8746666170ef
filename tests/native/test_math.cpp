// (a) The per-element rules of math.h against hand-derived values.
//
// Inputs are dyadic (0.25, 0.5, 1.5, ...) so every intermediate result is exact in float and
// double and the expected value can be worked out by hand; each check spells its formula.
#include <cmath>
#include <limits>
#include <type_traits>

#include "check.h"
#include "fastsgd/fastsgd.h"

using namespace fastsgd;

namespace {

const double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::numeric_limits<double>::quiet_NaN();

StepScalars dyadic_step() {
  StepScalars s;
  s.grad_scale = 0.5;  // loss_scale_factor 2
  s.window = 4;
  s.clip_value = 1.5;
  s.ema_keep = 0.75;
  return s;
}

TensorScalars dyadic_tensor() {
  TensorScalars t;
  t.clip_mul = 3;
  t.clip_div = 2;
  t.learning_rate = 0.25;
  t.momentum = 0.5;
  t.weight_decay = 0.5;
  t.dampening = 0.25;  // read by the torch rule only
  return t;
}

template <class C>
void elementwise_rules() {
  const math::Coeffs<C> k = math::make_coeffs<C>(dyadic_step(), dyadic_tensor());
  // make_coeffs: decay_factor = 1 - wd * lr = 1 - 0.5 * 0.25; ema_take = 1 - keep
  CHECK_BITS(k.decay_factor, C(0.875));
  CHECK_BITS(k.ema_take, C(0.25));
  CHECK_BITS(k.clip_lo, C(-1.5));
  CHECK_BITS(k.clip_hi, C(1.5));
  CHECK(!k.ema_overwrite);

  // unscale: g * grad_scale = 3 * 0.5
  CHECK_BITS(math::unscale(C(3), k), C(1.5));
  // accumulate: acc + g = 1.5 + 2.25
  CHECK_BITS(math::accumulate(C(1.5), C(2.25)), C(3.75));
  // window_mean: (g + acc) / window = (3 + 5) / 4
  CHECK_BITS(math::window_mean(C(3), C(5), k), C(2));
  // clip_by_norm: (g * clip_mul) / clip_div = (2 * 3) / 2
  CHECK_BITS(math::clip_by_norm(C(2), k), C(3));
  // clip_by_value: min(max(g, -1.5), 1.5); NaN passes through; the sign of zero is kept
  CHECK_BITS(math::clip_by_value(C(2), k), C(1.5));
  CHECK_BITS(math::clip_by_value(C(-2), k), C(-1.5));
  CHECK_BITS(math::clip_by_value(C(1), k), C(1));
  CHECK_BITS(math::clip_by_value(C(-0.0), k), C(-0.0));
  CHECK_BITS(math::clip_by_value(C(kInf), k), C(1.5));
  CHECK_BITS(math::clip_by_value(C(-kInf), k), C(-1.5));
  CHECK_NAN(math::clip_by_value(C(kNaN), k));
  // weight_decay: w * (1 - wd * lr) = 2 * 0.875
  CHECK_BITS(math::weight_decay(C(2), k), C(1.75));
  // plain_step: w - lr * g = 1 - 0.25 * 2
  CHECK_BITS(math::plain_step(C(1), C(2), k), C(0.5));
  // velocity: momentum * m - lr * g = 0.5 * 1 - 0.25 * 2 ; 0.5 * -1 - 0.25 * 1
  CHECK_BITS(math::velocity(C(1), C(2), k), C(0));
  CHECK_BITS(math::velocity(C(-1), C(1), k), C(-0.75));
  // nesterov_step: (w - lr * g) + momentum * m = (1 - 0.25) + 0.5 * -0.75
  CHECK_BITS(math::nesterov_step(C(1), C(1), C(-0.75), k), C(0.375));
  // ema: keep * avg + (1 - keep) * w = 0.75 * 4 + 0.25 * 8
  CHECK_BITS(math::ema(C(4), C(8), k), C(5));
  // effective_grad: (g * grad_scale + acc) / window = (3 * 0.5 + 5) / 4
  CHECK_BITS((math::effective_grad<C, true>(C(3), C(5), k)), C(1.625));
  CHECK_BITS((math::effective_grad<C, false>(C(3), C(5), k)), C(1.5));

  // Disabled options are identities: no clip value, no decay for excluded variables.
  StepScalars s = dyadic_step();
  s.clip_value = 0;
  TensorScalars t = dyadic_tensor();
  t.weight_decay = 0;  // what the engine passes for a variable excluded from decay
  const math::Coeffs<C> off = math::make_coeffs<C>(s, t);
  CHECK_BITS(math::clip_by_value(C(1e30), off), C(1e30));
  CHECK_BITS(math::clip_by_value(C(kInf), off), C(kInf));
  CHECK_NAN(math::clip_by_value(C(kNaN), off));
  CHECK_BITS(off.decay_factor, C(1));
  CHECK_BITS(math::weight_decay(C(2), off), C(2));
  CHECK_BITS(off.wd, C(0));
  CHECK(!off.maximize && !off.decay_l2 && !off.fresh_momentum);
  CHECK_BITS(math::maximize(C(1.5), off), C(1.5));
}

// The 0.2 rules, worked by hand with the dyadic scalars (lr 0.25, momentum 0.5, dampening
// 0.25, weight decay 0.5).
template <class C>
void torch_rules() {
  TensorScalars t = dyadic_tensor();
  t.maximize = true;
  t.decay_l2 = true;
  const math::Coeffs<C> k = math::make_coeffs<C>(dyadic_step(), t);
  // make_coeffs: neg_lr = -lr ; damp_take = 1 - dampening ; wd ; the flags
  CHECK_BITS(k.neg_lr, C(-0.25));
  CHECK_BITS(k.damp_take, C(0.75));
  CHECK_BITS(k.wd, C(0.5));
  CHECK(k.maximize && k.decay_l2 && !k.fresh_momentum);
  // maximize: -g, exact, the sign of zero flipped too
  CHECK_BITS(math::maximize(C(1.5), k), C(-1.5));
  CHECK_BITS(math::maximize(C(0.0), k), C(-0.0));
  CHECK_NAN(math::maximize(C(kNaN), k));
  // l2_decay: g + wd * w = 1 + 0.5 * 2
  CHECK_BITS(math::l2_decay(C(1), C(2), k), C(2));
  // torch_buffer: (1 - dampening) * g + momentum * b = 0.75 * 3 + 0.5 * 1
  CHECK_BITS(math::torch_buffer(C(1), C(3), k), C(2.75));
  // torch_nesterov: g + momentum * b = 3 + 0.5 * 2.75
  CHECK_BITS(math::torch_nesterov(C(2.75), C(3), k), C(4.375));
  // torch_step: w - lr * u = 2 - 0.25 * 4.375
  CHECK_BITS(math::torch_step(C(2), C(4.375), k), C(0.90625));
  // A slot's first step: b = g, whatever b held (no dampening on the first step, as torch).
  TensorScalars tf = t;
  tf.fresh_momentum = true;
  const math::Coeffs<C> kf = math::make_coeffs<C>(dyadic_step(), tf);
  CHECK_BITS(math::torch_buffer(C(1), C(3), kf), C(3));
  CHECK_BITS(math::torch_buffer(C(kNaN), C(3), kf), C(3));
}

// The torch rules round once per fused multiply-add (torch's add(x, alpha=a) is one fma on
// the CPU): find operands where fma and a separate multiply-add differ, and check each rule
// gives the fma.
template <class C>
void torch_rules_fuse() {
  uint32_t state = 12345;
  auto bits24 = [&]() {
    state = state * 1664525u + 1013904223u;
    return double(state >> 8);
  };
  // Values in [-1, 1) with a full double mantissa, so products are inexact in both types.
  auto next = [&]() {
    const double hi = bits24(), lo = bits24();
    return C((hi + lo / 16777216.0) / 8388608.0 - 1.0);
  };
  int differ = 0;
  for (int i = 0; i < 2000; ++i) {
    TensorScalars t;
    t.learning_rate = double(next());
    t.momentum = double(next()) * 0.5 + 0.5;
    t.weight_decay = double(next());
    t.dampening = double(next()) * 0.5 + 0.5;
    const math::Coeffs<C> k = math::make_coeffs<C>(StepScalars{}, t);
    const C w = next(), g = next(), b = next();
    CHECK_BITS(math::l2_decay(g, w, k), C(std::fma(w, k.wd, g)));
    CHECK_BITS(math::torch_buffer(b, g, k), C(std::fma(g, k.damp_take, b * k.momentum)));
    CHECK_BITS(math::torch_nesterov(b, g, k), C(std::fma(b, k.momentum, g)));
    CHECK_BITS(math::torch_step(w, g, k), C(std::fma(g, -k.lr, w)));
    // 1 - dampening is taken in double, then rounded once.
    CHECK_BITS(k.damp_take, C(1.0 - t.dampening));
    volatile C prod = w * k.wd;  // volatile: a separate rounding even where contraction is on
    if (C(prod + g) != math::l2_decay(g, w, k)) ++differ;
  }
  CHECK_MSG(differ > 0, "no operands found where fma differs from a separate multiply-add");
}

// The whole element update under each convention, worked by hand with w = 2, g = 3, m = -1,
// acc = 5, avg = 4 and the dyadic scalars. The gradient stages give g = 1.5 as in
// full_update below, then:
//   torch, L2:      g = 1.5 + 0.5 * 2 = 2.5
//     heavy ball:   b = 0.75 * 2.5 + 0.5 * -1 = 1.375 ; w = 2 - 0.25 * 1.375 = 1.65625
//     Nesterov:     b = 1.375 ; u = 2.5 + 0.5 * 1.375 = 3.1875 ; w = 2 - 0.25 * 3.1875 = 1.203125
//     first step:   b = 2.5 ; w = 2 - 0.25 * 2.5 = 1.375
//     no momentum:  w = 2 - 0.25 * 2.5 = 1.375 (m untouched)
//   torch, L2, maximize: g = -1.5 + 0.5 * 2 = -0.5 ; b = 0.75 * -0.5 - 0.5 = -0.875 ;
//                  w = 2 - 0.25 * -0.875 = 2.21875
//   torch, decoupled: w = 2 * 0.875 = 1.75 ; b = 0.75 * 1.5 - 0.5 = 0.625 ; w = 1.75 - 0.25 * 0.625 = 1.59375
//   keras, L2, maximize: g = -0.5 ; m = 0.5 * -1 - 0.25 * -0.5 = -0.375 ; w = 2 - 0.375 = 1.625
//   EMA:            avg = 0.75 * 4 + 0.25 * w
template <class C>
void full_update_conventions() {
  const StepScalars s = dyadic_step();
  auto run = [&](auto tag, MomentumKind mk, bool l2, bool maximize, bool fresh, C& w, C& m, C& acc, C& avg) {
    constexpr Convention R = decltype(tag)::value;
    TensorScalars t = dyadic_tensor();
    t.decay_l2 = l2;
    t.maximize = maximize;
    t.fresh_momentum = fresh;
    const math::Coeffs<C> k = math::make_coeffs<C>(s, t);
    w = 2, m = -1, acc = 5, avg = 4;
    if (mk == MomentumKind::heavy_ball)
      math::update<C, R, MomentumKind::heavy_ball, true, true, true>(w, C(3), m, acc, avg, k);
    else if (mk == MomentumKind::nesterov)
      math::update<C, R, MomentumKind::nesterov, true, true, true>(w, C(3), m, acc, avg, k);
    else
      math::update<C, R, MomentumKind::none, true, true, true>(w, C(3), m, acc, avg, k);
  };
  using Torch = std::integral_constant<Convention, Convention::torch>;
  using Keras = std::integral_constant<Convention, Convention::keras>;
  C w, m, acc, avg;
  run(Torch{}, MomentumKind::heavy_ball, true, false, false, w, m, acc, avg);
  CHECK_BITS(m, C(1.375));
  CHECK_BITS(w, C(1.65625));
  CHECK_BITS(acc, C(0));
  CHECK_BITS(avg, C(3.4140625));  // 3 + 0.25 * 1.65625
  run(Torch{}, MomentumKind::nesterov, true, false, false, w, m, acc, avg);
  CHECK_BITS(m, C(1.375));
  CHECK_BITS(w, C(1.203125));
  run(Torch{}, MomentumKind::heavy_ball, true, false, true, w, m, acc, avg);
  CHECK_BITS(m, C(2.5));
  CHECK_BITS(w, C(1.375));
  run(Torch{}, MomentumKind::none, true, false, false, w, m, acc, avg);
  CHECK_BITS(m, C(-1));
  CHECK_BITS(w, C(1.375));
  run(Torch{}, MomentumKind::heavy_ball, true, true, false, w, m, acc, avg);
  CHECK_BITS(m, C(-0.875));
  CHECK_BITS(w, C(2.21875));
  run(Torch{}, MomentumKind::heavy_ball, false, false, false, w, m, acc, avg);
  CHECK_BITS(m, C(0.625));
  CHECK_BITS(w, C(1.59375));
  run(Keras{}, MomentumKind::heavy_ball, true, true, false, w, m, acc, avg);
  CHECK_BITS(m, C(-0.375));
  CHECK_BITS(w, C(1.625));
  // fresh_momentum is a torch-convention flag: the Keras rule ignores it.
  run(Keras{}, MomentumKind::heavy_ball, false, false, true, w, m, acc, avg);
  CHECK_BITS(m, C(-0.875));
  CHECK_BITS(w, C(0.875));
}

// The whole element update, worked by hand with w = 2, g = 3, m = -1, acc = 5, avg = 4:
//   g = 3 * 0.5 = 1.5 ; g = (1.5 + 5) / 4 = 1.625 ; acc = 0
//   g = (1.625 * 3) / 2 = 2.4375 ; g = clip(2.4375, 1.5) = 1.5 ; w = 2 * 0.875 = 1.75
//   heavy ball: m = 0.5 * -1 - 0.25 * 1.5 = -0.875 ; w = 1.75 + -0.875 = 0.875
//   Nesterov:   m = -0.875 ; w = (1.75 - 0.375) + 0.5 * -0.875 = 0.9375
//   plain:      w = 1.75 - 0.25 * 1.5 = 1.375 (m untouched)
//   EMA:        avg = 0.75 * 4 + 0.25 * w
template <class C>
void full_update() {
  StepScalars s = dyadic_step();
  const math::Coeffs<C> k = math::make_coeffs<C>(s, dyadic_tensor());
  {
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, Convention::keras, MomentumKind::heavy_ball, true, true, true>(w, C(3), m, acc, avg, k);
    CHECK_BITS(w, C(0.875));
    CHECK_BITS(m, C(-0.875));
    CHECK_BITS(acc, C(0));
    CHECK_BITS(avg, C(3.21875));  // 3 + 0.25 * 0.875
  }
  {
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, Convention::keras, MomentumKind::nesterov, true, true, true>(w, C(3), m, acc, avg, k);
    CHECK_BITS(w, C(0.9375));
    CHECK_BITS(m, C(-0.875));
    CHECK_BITS(avg, C(3.234375));  // 3 + 0.25 * 0.9375
  }
  {
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, Convention::keras, MomentumKind::none, true, true, false>(w, C(3), m, acc, avg, k);
    CHECK_BITS(w, C(1.375));
    CHECK_BITS(m, C(-1));
    CHECK_BITS(avg, C(4));
  }
  {
    // Without the window merge and the norm clip: g = clip(3 * 0.5, 1.5) = 1.5, acc untouched.
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, Convention::keras, MomentumKind::heavy_ball, false, false, false>(w, C(3), m, acc, avg, k);
    CHECK_BITS(w, C(0.875));
    CHECK_BITS(acc, C(5));
  }
  {
    // EMA overwrite: the variable takes the new average.
    s.ema_overwrite = true;
    const math::Coeffs<C> ko = math::make_coeffs<C>(s, dyadic_tensor());
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, Convention::keras, MomentumKind::heavy_ball, true, true, true>(w, C(3), m, acc, avg, ko);
    CHECK_BITS(avg, C(3.21875));
    CHECK_BITS(w, C(3.21875));
    // accumulate_only: acc = 5 + 3 * 0.5 = 6.5 ; avg = 0.75 * 4 + 0.25 * 2 = 3.5 ; w = avg
    C w2 = 2, acc2 = 5, avg2 = 4;
    math::accumulate_only<C, true>(w2, C(3), acc2, avg2, ko);
    CHECK_BITS(acc2, C(6.5));
    CHECK_BITS(avg2, C(3.5));
    CHECK_BITS(w2, C(3.5));
    // ema_only: avg = 0.75 * 4 + 0.25 * 8 = 5 ; w = avg
    C w3 = 8, avg3 = 4;
    math::ema_only(w3, avg3, ko);
    CHECK_BITS(avg3, C(5));
    CHECK_BITS(w3, C(5));
  }
  {
    // Without overwrite the variable keeps its value.
    C w2 = 2, acc2 = 5, avg2 = 4;
    math::accumulate_only<C, true>(w2, C(3), acc2, avg2, k);
    CHECK_BITS(w2, C(2));
    CHECK_BITS(avg2, C(3.5));
    C w3 = 8, avg3 = 4;
    math::ema_only(w3, avg3, k);
    CHECK_BITS(w3, C(8));
    CHECK_BITS(avg3, C(5));
    // take_average: w = avg
    C w4 = 1;
    math::take_average(w4, C(-2.5));
    CHECK_BITS(w4, C(-2.5));
  }
  {
    // First EMA step (keep = 0): avg = 0 * avg + 1 * w = w.
    StepScalars s0 = dyadic_step();
    s0.ema_keep = 0;
    const math::Coeffs<C> k0 = math::make_coeffs<C>(s0, dyadic_tensor());
    C w = 8, avg = 4;
    math::ema_only(w, avg, k0);
    CHECK_BITS(avg, C(8));
  }
}

// Rounding happens in the compute type: decay_factor = 1 - float(wd) * float(lr) in float.
void float_rounding() {
  TensorScalars t;
  t.learning_rate = 0.1;
  t.weight_decay = 0.004;
  const math::Coeffs<float> k = math::make_coeffs<float>(StepScalars{}, t);
  const float expected = 1.0f - 0.004f * 0.1f;
  CHECK_BITS(k.decay_factor, expected);
  // Keras: SGD(0.1) on w = 1, g = 1 gives float32(0.9).
  CHECK_BITS(math::plain_step(1.0f, 1.0f, k), 0.9f);
}

// Norm clipping coefficients (in double, as the engine reduces).
void norm_clipping() {
  double mul = 0, div = 0;
  // clipnorm: g * c / max(||g||, c)
  math::clipnorm_coeffs<double>(25.0, 1.0, mul, div);  // ||g|| = 5 > 1: g * 1 / 5
  CHECK_BITS(mul, 1.0);
  CHECK_BITS(div, 5.0);
  math::clipnorm_coeffs<double>(0.25, 1.0, mul, div);  // ||g|| = 0.5 <= 1: g * 1 / 1
  CHECK_BITS(mul, 1.0);
  CHECK_BITS(div, 1.0);
  math::clipnorm_coeffs<double>(4.0, 2.0, mul, div);  // ||g|| = c = 2: g * 2 / 2
  CHECK_BITS(mul, 2.0);
  CHECK_BITS(div, 2.0);
  math::clipnorm_coeffs<double>(0.0, 2.0, mul, div);  // zero gradient: g * 2 / 2
  CHECK_BITS(mul, 2.0);
  CHECK_BITS(div, 2.0);
  math::clipnorm_coeffs<double>(kInf, 1.0, mul, div);  // infinite norm: g * 1 / inf = 0
  CHECK_BITS(mul, 1.0);
  CHECK_BITS(div, kInf);
  math::clipnorm_coeffs<double>(kNaN, 1.0, mul, div);  // NaN norm propagates
  CHECK_BITS(mul, 1.0);
  CHECK_NAN(div);
  {
    // float: ||g|| = 3 > 1.5: g * 1.5 / 3
    float fm = 0, fd = 0;
    math::clipnorm_coeffs<float>(9.0f, 1.5f, fm, fd);
    CHECK_BITS(fm, 1.5f);
    CHECK_BITS(fd, 3.0f);
  }

  // global_clipnorm: scale = c * min(1 / N, 1 / c) + (N - N)
  CHECK_BITS(math::global_clip_scale<double>(25.0, 1.0), 1.0 / 5.0);  // N = 5: 1 * (1/5)
  CHECK_BITS(math::global_clip_scale<double>(16.0, 2.0), 0.5);        // N = 4: 2 * 0.25
  CHECK_BITS(math::global_clip_scale<double>(0.25, 1.0), 1.0);        // N = 0.5 < c: c * (1/c)
  CHECK_BITS(math::global_clip_scale<double>(1.0, 4.0), 1.0);         // N = 1 < c = 4: 4 * 0.25
  CHECK_BITS(math::global_clip_scale<double>(0.0, 1.0), 1.0);         // N = 0: 1/N = inf, min -> 1/c
  CHECK_BITS(math::global_clip_scale<double>(0.0, 0.5), 1.0);         // 0.5 * 2
  CHECK_NAN(math::global_clip_scale<double>(kInf, 1.0));              // inf - inf = NaN
  CHECK_NAN(math::global_clip_scale<double>(kNaN, 1.0));
}

void dtype_basics() {
  CHECK(dtype_size(DType::float16) == 2);
  CHECK(dtype_size(DType::bfloat16) == 2);
  CHECK(dtype_size(DType::float32) == 4);
  CHECK(dtype_size(DType::float64) == 8);
  CHECK(std::string(dtype_name(DType::bfloat16)) == "bfloat16");
  CHECK(std::string(dtype_name(DType::float64)) == "float64");
  TensorView v{nullptr, 10, DType::float16};
  CHECK(v.nbytes() == 20);
  CHECK(device_name(Device{DeviceKind::cuda, 1}) == "cuda:1");
  CHECK(device_name(Device{}) == "cpu");
  CHECK(std::string(slot_kind_name(SlotKind::average)) == "average");
}

}  // namespace

int main() {
  elementwise_rules<float>();
  elementwise_rules<double>();
  full_update<float>();
  full_update<double>();
  torch_rules<float>();
  torch_rules<double>();
  torch_rules_fuse<float>();
  torch_rules_fuse<double>();
  full_update_conventions<float>();
  full_update_conventions<double>();
  float_rounding();
  norm_clipping();
  dtype_basics();
  return check::finish("test_math");
}
