// The SGD update rule, per element. This is the only place the formulas are spelled:
// the CPU walks (every ISA level) and the CUDA functor call these functions and nothing
// else touches an element. All arithmetic happens in the compute type C (float for
// float16/bfloat16/float32 storage, double for float64), with floating-point contraction
// disabled at build time so that every backend rounds identically; the fused multiply-adds
// of the torch convention are explicit fma() calls.
//
// Gradient, in order (both conventions):
//   g <- g * grad_scale                          unscale (1/loss_scale_factor, GradScaler)
//   g <- (g + acc) / window ; acc <- 0           end of an accumulation window
//   g <- (g * clip_mul) / clip_div               clipnorm / global_clipnorm
//   g <- min(max(g, -clip_value), clip_value)    clipvalue (NaN stays NaN)
//   g <- -g                                      maximize
// Weight decay: decoupled w <- w * (1 - wd * lr), or L2 g <- fma(w, wd, g).
// Keras convention (keras.optimizers.SGD, Keras 3 torch backend):
//   w <- w - lr * g                              plain SGD, or
//   m <- momentum * m - lr * g ; w <- w + m      heavy-ball momentum, or
//   m <- momentum * m - lr * g ; w <- (w - lr * g) + momentum * m     Nesterov
// torch convention (torch.optim.SGD's single-tensor loop, with its roundings):
//   b <- g on a slot's first step, else b <- fma(g, 1 - dampening, b * momentum)
//   u <- fma(b, momentum, g) (Nesterov) or u <- b ;  w <- fma(u, -lr, w)
//   without momentum: w <- fma(g, -lr, w)
// Then, in both:
//   avg <- keep * avg + (1 - keep) * w           EMA (keep = 0 on the first step)
//   w <- avg                                     periodic EMA overwrite
#pragma once

#include <cmath>
#include <limits>

#include "fastsgd/config.h"
#include "fastsgd/step.h"

namespace fastsgd {
inline namespace FASTSGD_ISA_NS {
namespace math {

using std::fma;
using std::sqrt;

// Step and tensor scalars converted once to the compute type.
template <class C>
struct Coeffs {
  C lr, neg_lr, momentum, damp_take, wd, grad_scale, window, clip_mul, clip_div, clip_lo, clip_hi;
  C decay_factor, ema_keep, ema_take;
  bool decay_l2, maximize, fresh_momentum, ema_overwrite;
};

template <class C>
FASTSGD_HD Coeffs<C> make_coeffs(const StepScalars& s, const TensorScalars& t) {
  Coeffs<C> k;
  k.lr = C(t.learning_rate);
  k.neg_lr = -k.lr;
  k.momentum = C(t.momentum);
  // 1 - dampening in double, then rounded, as torch turns a Python float into a kernel scalar.
  k.damp_take = C(1.0 - t.dampening);
  k.wd = C(t.weight_decay);
  k.grad_scale = C(s.grad_scale);
  k.window = C(s.window);
  k.clip_mul = C(t.clip_mul);
  k.clip_div = C(t.clip_div);
  const C inf = std::numeric_limits<C>::infinity();
  k.clip_lo = s.clip_value > 0 ? -C(s.clip_value) : -inf;
  k.clip_hi = s.clip_value > 0 ? C(s.clip_value) : inf;
  // decay_factor = 1 - wd * lr, rounded in C as Keras's torch backend does.
  k.decay_factor = t.weight_decay != 0 ? C(1) - k.wd * k.lr : C(1);
  k.decay_l2 = t.decay_l2;
  k.maximize = t.maximize;
  k.fresh_momentum = t.fresh_momentum;
  k.ema_keep = C(s.ema_keep);
  k.ema_take = C(1) - k.ema_keep;
  k.ema_overwrite = s.ema_overwrite;
  return k;
}

// g * (1 / loss_scale_factor)
template <class C> FASTSGD_HD C unscale(C g, const Coeffs<C>& k) { return g * k.grad_scale; }

// acc + g: one more gradient of the current accumulation window
template <class C> FASTSGD_HD C accumulate(C acc, C g) { return acc + g; }

// (g + acc) / window: the mean gradient of a finished accumulation window
template <class C> FASTSGD_HD C window_mean(C g, C acc, const Coeffs<C>& k) {
  return (g + acc) / k.window;
}

// (g * clip_mul) / clip_div: clipnorm uses (c, max(||g||, c)), global_clipnorm (scale, 1)
template <class C> FASTSGD_HD C clip_by_norm(C g, const Coeffs<C>& k) {
  return (g * k.clip_mul) / k.clip_div;
}

// clip(g, -v, v), written with comparisons so that NaN passes through unchanged
template <class C> FASTSGD_HD C clip_by_value(C g, const Coeffs<C>& k) {
  return g < k.clip_lo ? k.clip_lo : (g > k.clip_hi ? k.clip_hi : g);
}

// -g when maximizing (exact), else g
template <class C> FASTSGD_HD C maximize(C g, const Coeffs<C>& k) { return k.maximize ? -g : g; }

// decoupled weight decay: w * (1 - wd * lr)
template <class C> FASTSGD_HD C weight_decay(C w, const Coeffs<C>& k) { return w * k.decay_factor; }

// L2 weight decay: g + wd * w, fused as torch's g.add(w, alpha=wd)
template <class C> FASTSGD_HD C l2_decay(C g, C w, const Coeffs<C>& k) { return fma(w, k.wd, g); }

// w - lr * g
template <class C> FASTSGD_HD C plain_step(C w, C g, const Coeffs<C>& k) { return w - k.lr * g; }

// momentum * m - lr * g
template <class C> FASTSGD_HD C velocity(C m, C g, const Coeffs<C>& k) {
  return k.momentum * m - k.lr * g;
}

// (w - lr * g) + momentum * m, with m already updated
template <class C> FASTSGD_HD C nesterov_step(C w, C g, C m, const Coeffs<C>& k) {
  return (w - k.lr * g) + k.momentum * m;
}

// torch momentum buffer: g on its first step, else (1 - dampening) * g + momentum * b
template <class C> FASTSGD_HD C torch_buffer(C b, C g, const Coeffs<C>& k) {
  return k.fresh_momentum ? g : fma(g, k.damp_take, b * k.momentum);
}

// torch Nesterov direction: g + momentum * b, with b already updated
template <class C> FASTSGD_HD C torch_nesterov(C b, C g, const Coeffs<C>& k) { return fma(b, k.momentum, g); }

// torch step: w - lr * u, fused as torch's w.add(u, alpha=-lr)
template <class C> FASTSGD_HD C torch_step(C w, C u, const Coeffs<C>& k) { return fma(u, k.neg_lr, w); }

// keep * avg + (1 - keep) * w
template <class C> FASTSGD_HD C ema(C avg, C w, const Coeffs<C>& k) {
  return k.ema_keep * avg + k.ema_take * w;
}

// Keras sums squares in the variables' precision: for float32 and 16-bit variables a sum
// beyond float32's range is inf there, whatever the float64 sum holds. `narrow` asks for that
// (0x1.ffffffp127 is where float32 rounding reaches inf).
FASTSGD_HD double keras_sum_squares(double sum_squares, bool narrow) {
  return (narrow && sum_squares >= 0x1.ffffffp127) ? std::numeric_limits<double>::infinity() : sum_squares;
}

// Norm clipping coefficients from a sum of squares, in the precision R of the reduction.
// clipnorm (per tensor): g <- (g * c) / max(||g||, c); NaN norms propagate, as in Keras.
template <class R>
FASTSGD_HD void clipnorm_coeffs(R sum_squares, R clipnorm, R& mul, R& div) {
  const R norm = sum_squares > R(0) ? sqrt(sum_squares) : sum_squares;
  mul = clipnorm;
  div = (norm != norm) ? norm : (norm > clipnorm ? norm : clipnorm);
}

// global_clipnorm: g <- g * (c * min(1/N, 1/c) + (N - N)); the (N - N) term turns an
// infinite or NaN global norm into a NaN scale, as in Keras's clip_by_global_norm.
template <class R>
FASTSGD_HD R global_clip_scale(R sum_squares, R clipnorm) {
  const R norm = sqrt(sum_squares);
  const R inv_norm = R(1) / norm;
  const R inv_clip = R(1) / clipnorm;
  const R smaller = (inv_norm != inv_norm) ? inv_norm : (inv_norm < inv_clip ? inv_norm : inv_clip);
  return clipnorm * smaller + (norm - norm);
}

// Gradient as the update will see it before clipping; also what norm clipping measures.
template <class C, bool MergeWindow>
FASTSGD_HD C effective_grad(C g, C acc, const Coeffs<C>& k) {
  g = unscale(g, k);
  if constexpr (MergeWindow) g = window_mean(g, acc, k);
  return g;
}

// The whole update of one element on an update call. `m`, `acc` and `avg` are only
// read or written when the corresponding compile-time feature is on. GradTransforms = false
// may be chosen only when unscale and clip-by-value are identities (grad_scale == 1, no
// clipvalue), and Decay = false only when the tensor's weight decay is 0: skipping an
// identity gives the same bits, NaN included.
template <class C, Convention R, MomentumKind MK, bool MergeWindow, bool NormClip, bool Ema,
          bool GradTransforms = true, bool Decay = true>
FASTSGD_HD void update(C& w, C g, C& m, C& acc, C& avg, const Coeffs<C>& k) {
  if constexpr (GradTransforms) g = unscale(g, k);
  if constexpr (MergeWindow) {
    g = window_mean(g, acc, k);
    acc = C(0);
  }
  if constexpr (NormClip) g = clip_by_norm(g, k);
  if constexpr (GradTransforms) g = clip_by_value(g, k);
  g = maximize(g, k);
  if constexpr (Decay) {
    if (k.decay_l2) g = l2_decay(g, w, k);
    else w = weight_decay(w, k);
  }
  if constexpr (R == Convention::keras) {
    if constexpr (MK == MomentumKind::none) {
      w = plain_step(w, g, k);
    } else {
      m = velocity(m, g, k);
      w = (MK == MomentumKind::nesterov) ? nesterov_step(w, g, m, k) : w + m;
    }
  } else {
    if constexpr (MK == MomentumKind::none) {
      w = torch_step(w, g, k);
    } else {
      m = torch_buffer(m, g, k);
      w = torch_step(w, (MK == MomentumKind::nesterov) ? torch_nesterov(m, g, k) : m, k);
    }
  }
  if constexpr (Ema) {
    avg = ema(avg, w, k);
    w = k.ema_overwrite ? avg : w;
  }
}

// A non-update call under accumulation: store the unscaled gradient, then the EMA.
template <class C, bool Ema>
FASTSGD_HD void accumulate_only(C& w, C g, C& acc, C& avg, const Coeffs<C>& k) {
  acc = accumulate(acc, unscale(g, k));
  if constexpr (Ema) {
    avg = ema(avg, w, k);
    w = k.ema_overwrite ? avg : w;
  }
}

// A built variable without a gradient this call: EMA and overwrite only.
template <class C>
FASTSGD_HD void ema_only(C& w, C& avg, const Coeffs<C>& k) {
  avg = ema(avg, w, k);
  w = k.ema_overwrite ? avg : w;
}

// finalize_variable_values: the variable takes its average.
template <class C>
FASTSGD_HD void take_average(C& w, C avg) { w = avg; }

}  // namespace math
}  // namespace FASTSGD_ISA_NS
}  // namespace fastsgd
