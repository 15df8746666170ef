// Element types fastsgd stores, and the exact conversions between 16-bit storage and the
// float32 compute type. Conversions are written with integer bit operations so the CPU
// (every ISA level) and CUDA round identically: float -> half/bfloat16 is IEEE
// round-to-nearest-even, NaN stays NaN, overflow goes to infinity.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastsgd/config.h"

namespace fastsgd {

enum class DType : int32_t { float16 = 0, bfloat16 = 1, float32 = 2, float64 = 3 };

// 16-bit storage types: plain bit containers, arithmetic always happens in float.
struct half_t { uint16_t bits; };
struct bfloat16_t { uint16_t bits; };

// Functions live in the per-ISA namespace (see config.h).
inline namespace FASTSGD_ISA_NS {

inline constexpr int dtype_size(DType t) {
  return t == DType::float64 ? 8 : (t == DType::float32 ? 4 : 2);
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
    case DType::float32: return "float32";
    case DType::float64: return "float64";
  }
  return "unknown";
}

namespace detail {

FASTSGD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FASTSGD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

}  // namespace detail

FASTSGD_HD float to_float(bfloat16_t v) { return detail::bits_float(uint32_t(v.bits) << 16); }

FASTSGD_HD bfloat16_t to_bfloat16(float f) {
  uint32_t u = detail::float_bits(f);
  // NaN must stay NaN: rounding could carry its payload into the exponent (infinity).
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{uint16_t((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16_t{uint16_t(u >> 16)};
}

FASTSGD_HD float to_float(half_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return detail::bits_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return detail::bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Subnormal half: exactly man * 2^-24, representable in float.
  const float mag = float(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

FASTSGD_HD half_t to_half(float f) {
  const uint32_t u = detail::float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu))};
  if (abs >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (abs >= 0x38800000u) {  // normal half range
    uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);
    return half_t{uint16_t(sign | (r >> 13))};
  }
  if (abs < 0x33000000u) return half_t{uint16_t(sign)};  // below half of the smallest subnormal
  // Subnormal half: shift the full significand, rounding to nearest even on the dropped bits.
  const uint32_t e = abs >> 23;
  const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // in 14..24
  const uint32_t kept = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  const uint32_t up = (rem > halfway || (rem == halfway && (kept & 1u))) ? 1u : 0u;
  return half_t{uint16_t(sign | (kept + up))};
}

// load<C>(storage) / store(storage, C): the only way kernels read and write elements.
template <class C> FASTSGD_HD C load(float v) { return C(v); }
template <class C> FASTSGD_HD C load(double v) { return C(v); }
template <class C> FASTSGD_HD C load(half_t v) { return C(to_float(v)); }
template <class C> FASTSGD_HD C load(bfloat16_t v) { return C(to_float(v)); }

FASTSGD_HD void store(float& dst, float v) { dst = v; }
FASTSGD_HD void store(double& dst, double v) { dst = v; }
FASTSGD_HD void store(half_t& dst, float v) { dst = to_half(v); }
FASTSGD_HD void store(bfloat16_t& dst, float v) { dst = to_bfloat16(v); }

// The type arithmetic happens in for a given storage type ("opmath").
template <class S> struct compute_type { using type = float; };
template <> struct compute_type<double> { using type = double; };

}  // namespace FASTSGD_ISA_NS

}  // namespace fastsgd
