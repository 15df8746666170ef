// Element types fastsgd stores, and the exact conversions between 16-bit storage and the
// float32 compute type. Conversions are written with integer bit operations so the CPU
// (every ISA level) and CUDA round identically: float -> half/bfloat16 is IEEE
// round-to-nearest-even, NaN stays NaN (quieted, payload kept), overflow goes to infinity.
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

namespace bits {

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

FASTSGD_HD uint64_t double_bits(double d) {
#if defined(__CUDA_ARCH__)
  return uint64_t(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
#endif
}

FASTSGD_HD double bits_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double((long long)u);
#else
  double d;
  std::memcpy(&d, &u, 8);
  return d;
#endif
}

// The unsigned integer of a compute type's width, and conversions to and from its bits.
template <class C> struct word;
template <> struct word<float> { using type = uint32_t; };
template <> struct word<double> { using type = uint64_t; };
FASTSGD_HD uint32_t to_word(float f) { return float_bits(f); }
FASTSGD_HD uint64_t to_word(double d) { return double_bits(d); }
template <class C> FASTSGD_HD C from_word(typename word<C>::type u);
template <> FASTSGD_HD float from_word<float>(uint32_t u) { return bits_float(u); }
template <> FASTSGD_HD double from_word<double>(uint64_t u) { return bits_double(u); }

}  // namespace bits

FASTSGD_HD float to_float(bfloat16_t v) { return bits::bits_float(uint32_t(v.bits) << 16); }

FASTSGD_HD bfloat16_t to_bfloat16(float f) {
  uint32_t u = bits::float_bits(f);
  // NaN must stay NaN: rounding could carry its payload into the exponent (infinity).
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{uint16_t((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16_t{uint16_t(u >> 16)};
}

// The half conversions are written with selects instead of branches so that compilers
// vectorise them; every lane computes all cases and keeps the one that applies.
FASTSGD_HD float to_float(half_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  const uint32_t normal = ((exp + 112u) << 23) | (man << 13);  // rebias 15 -> 127
  // Infinity, or NaN with its payload kept and the quiet bit set (as F16C's vcvtph2ps does,
  // so the CPU walks may widen with it and still match this definition bit for bit).
  const uint32_t special = 0x7f800000u | (man << 13) | (man != 0u ? 0x00400000u : 0u);
  // Subnormal: 2^-14 * (1 + man/1024) - 2^-14 = man * 2^-24, exactly.
  const float subnormal = bits::bits_float((man << 13) | 0x38800000u) - bits::bits_float(0x38800000u);
  const float magnitude = exp == 0u ? subnormal : bits::bits_float(exp == 0x1fu ? special : normal);
  return bits::bits_float(bits::float_bits(magnitude) | sign);
}

FASTSGD_HD half_t to_half(float f) {
  const uint32_t u = bits::float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  // Normal half: rebias 127 -> 15 (wrapping add), round to nearest even on the 13 dropped bits.
  const uint32_t normal = (abs + 0xc8000fffu + ((abs >> 13) & 1u)) >> 13;
  // Subnormal half: adding 0.5 lets the FPU round the bits into place (nearest even).
  const uint32_t subnormal = bits::float_bits(bits::bits_float(abs) + 0.5f) - 0x3f000000u;
  // >= 65536: infinity, or NaN with its payload kept (quiet bit set).
  const uint32_t special = abs > 0x7f800000u ? (0x7e00u | ((abs >> 13) & 0x3ffu)) : 0x7c00u;
  const uint32_t r = abs >= 0x47800000u ? special : (abs < 0x38800000u ? subnormal : normal);
  return half_t{uint16_t(sign | r)};
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
