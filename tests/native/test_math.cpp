// (a) The per-element rules of math.h against hand-derived values.
//
// Inputs are dyadic (0.25, 0.5, 1.5, ...) so every intermediate result is exact in float and
// double and the expected value can be worked out by hand; each check spells its formula.
#include <cmath>
#include <limits>

#include "check.h"
#include "fastsgd/fastsgd.h"

using namespace fastsgd;

namespace {

const double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::numeric_limits<double>::quiet_NaN();

StepScalars dyadic_step() {
  StepScalars s;
  s.learning_rate = 0.25;
  s.momentum = 0.5;
  s.grad_scale = 0.5;  // loss_scale_factor 2
  s.window = 4;
  s.weight_decay = 0.5;
  s.clip_value = 1.5;
  s.ema_keep = 0.75;
  return s;
}

TensorScalars dyadic_tensor() {
  TensorScalars t;
  t.clip_mul = 3;
  t.clip_div = 2;
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
  t.decays = false;
  const math::Coeffs<C> off = math::make_coeffs<C>(s, t);
  CHECK_BITS(math::clip_by_value(C(1e30), off), C(1e30));
  CHECK_BITS(math::clip_by_value(C(kInf), off), C(kInf));
  CHECK_NAN(math::clip_by_value(C(kNaN), off));
  CHECK_BITS(off.decay_factor, C(1));
  CHECK_BITS(math::weight_decay(C(2), off), C(2));
  s.weight_decay = 0;
  t.decays = true;
  CHECK_BITS((math::make_coeffs<C>(s, t).decay_factor), C(1));
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
    math::update<C, MomentumKind::heavy_ball, true, true, true>(w, C(3), m, acc, avg, k);
    CHECK_BITS(w, C(0.875));
    CHECK_BITS(m, C(-0.875));
    CHECK_BITS(acc, C(0));
    CHECK_BITS(avg, C(3.21875));  // 3 + 0.25 * 0.875
  }
  {
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, MomentumKind::nesterov, true, true, true>(w, C(3), m, acc, avg, k);
    CHECK_BITS(w, C(0.9375));
    CHECK_BITS(m, C(-0.875));
    CHECK_BITS(avg, C(3.234375));  // 3 + 0.25 * 0.9375
  }
  {
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, MomentumKind::none, true, true, false>(w, C(3), m, acc, avg, k);
    CHECK_BITS(w, C(1.375));
    CHECK_BITS(m, C(-1));
    CHECK_BITS(avg, C(4));
  }
  {
    // Without the window merge and the norm clip: g = clip(3 * 0.5, 1.5) = 1.5, acc untouched.
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, MomentumKind::heavy_ball, false, false, false>(w, C(3), m, acc, avg, k);
    CHECK_BITS(w, C(0.875));
    CHECK_BITS(acc, C(5));
  }
  {
    // EMA overwrite: the variable takes the new average.
    s.ema_overwrite = true;
    const math::Coeffs<C> ko = math::make_coeffs<C>(s, dyadic_tensor());
    C w = 2, m = -1, acc = 5, avg = 4;
    math::update<C, MomentumKind::heavy_ball, true, true, true>(w, C(3), m, acc, avg, ko);
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
  StepScalars s;
  s.learning_rate = 0.1;
  s.weight_decay = 0.004;
  const math::Coeffs<float> k = math::make_coeffs<float>(s, TensorScalars{});
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
  float_rounding();
  norm_clipping();
  dtype_basics();
  return check::finish("test_math");
}
