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
// 16-bit variables (float16, bfloat16), at the end of this file: the update may start from a
// float32 master (a slot, or the variable's bits joined with a 16-bit remainder) and store the
// variable rounded to nearest or stochastically, with random bits from a counter-based
// generator keyed by (seed, step, variable, element): no state, so every ISA level, thread
// split and CUDA draw the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "fastsgd/config.h"
#include "fastsgd/dtype.h"
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
  // The per-tensor choices as bools (the scalar test reference reads these, and the L2 branch
  // of builds without a hardware fma) and, made from the same bools here only, as bit masks
  // for pick: the sign bit when maximizing, else 0; all ones for L2 decay, on a torch momentum
  // slot's first step, and on an EMA overwrite step, else 0.
  bool decay_l2, maximize, fresh_momentum, ema_overwrite;
  typename bits::word<C>::type sign_flip, l2_mask, fresh_mask, overwrite_mask;
};

// a where mask is all ones, b where it is 0, chosen bit by bit. Per-element choices that hang
// on a per-tensor bool are written this way: GCC vectorises a select on a bool loaded from
// memory only when it unswitches the loop, which it stops doing as loops grow.
template <class C>
FASTSGD_HD C pick(typename bits::word<C>::type mask, C a, C b) {
  return bits::from_word<C>((bits::to_word(a) & mask) | (bits::to_word(b) & ~mask));
}

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
  using Word = typename bits::word<C>::type;
  k.sign_flip = t.maximize ? bits::to_word(C(-0.0)) : Word(0);
  k.l2_mask = t.decay_l2 ? ~Word(0) : Word(0);
  k.fresh_mask = t.fresh_momentum ? ~Word(0) : Word(0);
  k.overwrite_mask = s.ema_overwrite ? ~Word(0) : Word(0);
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
// (An xor of the sign bit, exactly what negation does: a select on the bool would stop GCC's
// vectoriser wherever it does not unswitch the loop.)
template <class C> FASTSGD_HD C maximize(C g, const Coeffs<C>& k) {
  return bits::from_word<C>(bits::to_word(g) ^ k.sign_flip);
}

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
  return pick(k.fresh_mask, g, fma(g, k.damp_take, b * k.momentum));
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
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__aarch64__)
    const C decayed = weight_decay(w, k);
    g = pick(k.l2_mask, l2_decay(g, w, k), g);
    w = pick(k.l2_mask, w, decayed);
#else
    // Without a hardware fma, computing both forms would call libm's fma on every element.
    if (k.decay_l2) g = l2_decay(g, w, k);
    else w = weight_decay(w, k);
#endif
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
    w = pick(k.overwrite_mask, avg, w);
  }
}

// A non-update call under accumulation: store the unscaled gradient, then the EMA.
template <class C, bool Ema>
FASTSGD_HD void accumulate_only(C& w, C g, C& acc, C& avg, const Coeffs<C>& k) {
  acc = accumulate(acc, unscale(g, k));
  if constexpr (Ema) {
    avg = ema(avg, w, k);
    w = pick(k.overwrite_mask, avg, w);
  }
}

// A built variable without a gradient this call: EMA and overwrite only.
template <class C>
FASTSGD_HD void ema_only(C& w, C& avg, const Coeffs<C>& k) {
  avg = ema(avg, w, k);
  w = pick(k.overwrite_mask, avg, w);
}

// finalize_variable_values: the variable takes its average.
template <class C>
FASTSGD_HD void take_average(C& w, C avg) { w = avg; }


// ---- 16-bit storage: random streams, stochastic rounding, remainders ---------------------------

// splitmix64's finaliser: a bijection of 64-bit words that mixes every input bit into every
// output bit.
FASTSGD_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// lowbias32 (C. Wellons): a bijection of 32-bit words with low avalanche bias; 32-bit
// multiplies, so it vectorises on every ISA level.
FASTSGD_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// The key of variable `tensor`'s random stream at raw step `step`, under `seed`:
// mix64(mix64(mix64(seed) ^ step) ^ (tensor + golden)). Computed once per tensor and step.
FASTSGD_HD uint64_t random_stream(uint64_t seed, uint64_t step, uint64_t tensor) {
  return mix64(mix64(mix64(seed) ^ step) ^ (tensor + 0x9e3779b97f4a7c15ull));
}

// A step-independent stream (remainders with stochastic rounding, which must regenerate the
// bits of an earlier step from what the slots hold).
constexpr uint64_t kStepless = ~0ull;

// Element i of a stream draws mix32(segment_key(stream, i) + uint32_t(i)). The segment key is
// the stream's low word xor its high word, plus the index's high word times 0x9e3779b9: it is
// the same for 2^32 consecutive elements, so a walk computes it once per segment and counts in
// 32 bits, which every vector unit does natively.
FASTSGD_HD uint32_t segment_key(uint64_t stream, int64_t i) {
  return (uint32_t(stream) ^ uint32_t(stream >> 32)) + uint32_t(uint64_t(i) >> 32) * 0x9e3779b9u;
}

// 16 random bits for element j (low 32 bits of its index) of a segment: the high half of
// mix32(key + j).
FASTSGD_HD uint32_t random16(uint32_t key, uint32_t j) { return mix32(key + j) >> 16; }

// As random16, further keyed by `salt` (a remainder's 16 bits): mix32(mix32(key + j) ^ salt).
FASTSGD_HD uint32_t random16_salted(uint32_t key, uint32_t j, uint32_t salt) {
  return mix32(mix32(key + j) ^ salt) >> 16;
}

// float32 bits u -> bfloat16 bits (u + r) >> 16: the high half, plus one in magnitude when the
// low half lo carries, lo + r >= 2^16. r = 0x8000 rounds to nearest with ties away from zero;
// r uniform in [0, 2^16) rounds stochastically, up with probability lo / 2^16 exactly, so the
// expected result is x itself. Carries into the exponent are correct (to infinity past the
// largest bfloat16); Inf has lo = 0 and stays; NaN stays a quiet NaN.
// (All in 32-bit lanes, narrowed once: mixed 16/32-bit selects stop GCC's vectoriser.)
FASTSGD_HD uint16_t bf16_round_bits(uint32_t u, uint32_t r) {
  const uint32_t nan = u | 0x00400000u;
  return uint16_t(((u & 0x7fffffffu) > 0x7f800000u ? nan : u + r) >> 16);
}

// float32 -> float16 rounded stochastically with 16 random bits r: P(up) = dropped / ulp.
// Normal halves drop 13 bits, r >> 3 is 13 uniform bits added below the kept ones: exact
// probability. Subnormal halves (|x| < 2^-14, ulp 2^-24): |x| / 2^-24 = q + f with q an
// integer and 0 <= f < 1; up when floor(f * 2^16) + r >= 2^16, probability floor(f * 2^16) / 2^16,
// within 2^-16 ulp of f. Overflow, Inf and NaN as to_half (a carry past 65504 gives infinity).
// Integer operations only: q and f come from shifting the 24-bit significand right by
// 126 - exponent, in two clamped steps since that can exceed 31 (C++ shifts stop at 31), and
// no float operation sits where GCC could sink it into a branch the vectoriser cannot undo.
FASTSGD_HD uint16_t half_round_stochastic(float x, uint32_t r) {
  const uint32_t u = bits::float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  const uint32_t normal = (abs + 0xc8000000u + (r >> 3)) >> 13;
  const uint32_t exponent = abs >> 23;
  const uint32_t shift = exponent <= 118u ? 126u - exponent : 8u;  // >= 14 for subnormal halves
  const uint32_t first = shift < 31u ? shift : 31u;
  const uint32_t rest = shift - first < 31u ? shift - first : 31u;
  const uint32_t significand = (abs & 0x7fffffu) | (exponent != 0u ? 0x800000u : 0u);
  const uint32_t q = significand >> first;
  const uint32_t dropped = significand & ((1u << first) - 1u);
  const uint32_t f16 = ((dropped << 8) >> (first - 8u)) >> rest;  // floor(f * 2^16)
  const uint32_t subnormal = q + ((f16 + r) >> 16);
  const uint32_t special = abs > 0x7f800000u ? (0x7e00u | ((abs >> 13) & 0x3ffu)) : 0x7c00u;
  const uint32_t out = abs >= 0x47800000u ? special : (abs < 0x38800000u ? subnormal : normal);
  return uint16_t(sign | out);
}

// The stored variable for a float32 value w: to nearest (even, as store() does) or
// stochastically with random bits r.
template <bool Stochastic>
FASTSGD_HD void store_rounded(bfloat16_t& dst, float w, uint32_t r) {
  if constexpr (Stochastic) dst.bits = bf16_round_bits(bits::float_bits(w), r);
  else store(dst, w);
}
template <bool Stochastic>
FASTSGD_HD void store_rounded(half_t& dst, float w, uint32_t r) {
  if constexpr (Stochastic) dst.bits = half_round_stochastic(w, r);
  else store(dst, w);
}

// Remainders: a bfloat16 variable v and a 16-bit remainder lo hold the float32 master with bits
// u = hi << 16 | lo exactly, where v = bf16_round_bits(u, r) = hi + up, up = (lo + r >= 2^16).
// r is 0x8000 (to nearest, ties away: round to nearest even could not be undone) or, with
// stochastic rounding, random16_salted(key, j, lo) of a step-independent stream, which the
// next step regenerates from lo. Join: hi = v - up; a NaN master stays NaN (v - up keeps an
// all-ones exponent and a nonzero mantissa), Inf has lo = 0 and joins exactly.
template <bool Stochastic>
FASTSGD_HD uint32_t remainder_bits(uint32_t lo, uint32_t key, uint32_t j) {
  if constexpr (Stochastic) return random16_salted(key, j, lo);
  else return 0x8000u;
}

// (v, lo) -> the float32 master
template <bool Stochastic>
FASTSGD_HD float remainder_join(bfloat16_t v, uint16_t lo, uint32_t key, uint32_t j) {
  const uint32_t up = (uint32_t(lo) + remainder_bits<Stochastic>(lo, key, j)) >> 16;
  return bits::bits_float(((uint32_t(v.bits) - up) << 16) | lo);
}

// the float32 master w -> (v, lo)
template <bool Stochastic>
FASTSGD_HD void remainder_split(float w, bfloat16_t& v, uint16_t& lo, uint32_t key, uint32_t j) {
  const uint32_t u = bits::float_bits(w);
  lo = uint16_t(u & 0xffffu);
  v.bits = bf16_round_bits(u, remainder_bits<Stochastic>(lo, key, j));
}

}  // namespace math
}  // namespace FASTSGD_ISA_NS
}  // namespace fastsgd
