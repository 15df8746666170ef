// (b) dtype.h: float16 / bfloat16 <-> float32 conversions.
//
//  * every one of the 65536 float16 and bfloat16 bit patterns: to_float against a value
//    computed independently (ldexp), and the round trip back to the same bits (NaN stays NaN,
//    with the quiet bit set);
//  * float -> float16 / bfloat16 against an independent nearest-even rounding (the two
//    neighbouring representable values, compared in double) over a sweep of float patterns
//    that covers every exponent with the bits around the rounding position;
//  * chosen ties, overflow, subnormal and NaN cases, worked by hand;
//  * on x86 CPUs with F16C, vcvtph2ps / vcvtps2ph against to_float / to_half bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "check.h"
#include "fastsgd/dtype.h"

using namespace fastsgd;

namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// The value of a float16 pattern, from the IEEE 754 definition.
double half_value(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(double(man), -24);  // subnormal: man * 2^-24
  } else if (exp == 0x1f) {
    v = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(1.0 + man / 1024.0, exp - 15);
  }
  return sign ? -v : v;
}

void half_exhaustive() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = to_float(half_t{uint16_t(h)});
    const double expected = half_value(uint16_t(h));
    const bool nan = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff);
    if (nan) {
      // NaN: sign and payload move to the top of the float mantissa, quiet bit set (a
      // signalling NaN is quieted, as x86 F16C's vcvtph2ps does).
      const uint32_t want = ((h & 0x8000u) << 16) | 0x7fc00000u | ((h & 0x3ffu) << 13);
      CHECK_MSG(to_bits(f) == want, "half 0x%04x -> float 0x%08x, expected 0x%08x", h, to_bits(f), want);
      const uint16_t back = to_half(f).bits;
      CHECK_MSG(back == (h | 0x0200u), "half NaN 0x%04x -> 0x%04x, expected 0x%04x", h, back, h | 0x200u);
    } else {
      CHECK_MSG(to_bits(f) == to_bits(float(expected)), "half 0x%04x -> %.9g, expected %.9g", h,
                double(f), expected);
      const uint16_t back = to_half(f).bits;
      CHECK_MSG(back == h, "half 0x%04x -> %.9g -> 0x%04x", h, double(f), back);
    }
  }
}

void bfloat16_exhaustive() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = to_float(bfloat16_t{uint16_t(h)});
    CHECK_MSG(to_bits(f) == h << 16, "bfloat16 0x%04x -> float 0x%08x", h, to_bits(f));
    const bool nan = ((h >> 7) & 0xff) == 0xff && (h & 0x7f);
    const uint16_t back = to_bfloat16(f).bits;
    const uint32_t want = nan ? (h | 0x0040u) : h;
    CHECK_MSG(back == want, "bfloat16 0x%04x -> 0x%04x, expected 0x%04x", h, back, want);
  }
}

// ---- independent nearest-even references ----------------------------------------------------

// Non-negative float16 patterns 0x0000..0x7c00 in increasing order of value; for rounding,
// 0x7c00 (infinity) stands for 2^16, the next step after 65504 (IEEE 754 overflow rule).
const std::vector<double>& half_ladder() {
  static const std::vector<double> ladder = [] {
    std::vector<double> v(0x7c01);
    for (uint32_t p = 0; p < 0x7c00; ++p) v[p] = half_value(uint16_t(p));
    v[0x7c00] = 65536.0;
    return v;
  }();
  return ladder;
}

uint16_t half_reference(float f) {
  const uint32_t u = to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  if (std::isnan(f)) return 0x7e00;  // only "is NaN" is compared
  const double x = std::fabs(double(f));
  const auto& ladder = half_ladder();
  if (x >= 65536.0) return uint16_t(sign | 0x7c00u);
  // p: the largest pattern whose value is <= x; q = p + 1.
  const size_t p = size_t(std::upper_bound(ladder.begin(), ladder.end(), x) - ladder.begin()) - 1;
  if (ladder[p] == x) return uint16_t(sign | p);
  const double below = x - ladder[p], above = ladder[p + 1] - x;  // exact in double
  const size_t r = below < above ? p : (above < below ? p + 1 : (p % 2 == 0 ? p : p + 1));
  return uint16_t(sign | r);
}

double bfloat16_magnitude(uint32_t p) {  // p in 0..0x7f80; 0x7f80 stands for 2^128
  return p == 0x7f80u ? std::ldexp(1.0, 128) : double(from_bits(p << 16));
}

uint16_t bfloat16_reference(float f) {
  const uint32_t u = to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  if (std::isnan(f)) return 0x7fc0;
  if (std::isinf(f)) return uint16_t(sign | 0x7f80u);
  const uint32_t p = (u & 0x7fffffffu) >> 16;  // truncation toward zero
  const double x = std::fabs(double(f));
  const double below = x - bfloat16_magnitude(p), above = bfloat16_magnitude(p + 1) - x;
  if (below == 0) return uint16_t(sign | p);
  const uint32_t r = below < above ? p : (above < below ? p + 1 : (p % 2 == 0 ? p : p + 1));
  return uint16_t(sign | r);
}

void compare_half(float f) {
  const uint16_t got = to_half(f).bits, want = half_reference(f);
  if (std::isnan(f)) {
    const uint32_t u = to_bits(f);
    const uint16_t nan = uint16_t(((u >> 16) & 0x8000u) | 0x7e00u | ((u >> 13) & 0x3ffu));
    CHECK_MSG(got == nan, "to_half(NaN 0x%08x) = 0x%04x, expected 0x%04x", u, got, nan);
    return;
  }
  CHECK_MSG(got == want, "to_half(%.9g = 0x%08x) = 0x%04x, expected 0x%04x", double(f), to_bits(f),
            got, want);
}

void compare_bfloat16(float f) {
  const uint16_t got = to_bfloat16(f).bits, want = bfloat16_reference(f);
  if (std::isnan(f)) {
    CHECK_MSG((got & 0x7f80u) == 0x7f80u && (got & 0x7fu) != 0, "to_bfloat16(NaN 0x%08x) = 0x%04x",
              to_bits(f), got);
    return;
  }
  CHECK_MSG(got == want, "to_bfloat16(%.9g = 0x%08x) = 0x%04x, expected 0x%04x", double(f),
            to_bits(f), got, want);
}

void rounding_sweeps() {
  std::mt19937 rng(12345);
  const int before = check::failures();
  // float16 keeps 10 of the 23 mantissa bits of a normal value: vary the 19 top bits
  // exhaustively (sign, exponent, the kept mantissa bits) with dropped bits at and around the
  // half-way point; subnormal results drop more bits, which the random patterns cover.
  const uint32_t low13[] = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff};
  for (uint32_t hi = 0; hi < (1u << 19); ++hi) {
    for (uint32_t lo : low13) compare_half(from_bits((hi << 13) | lo));
    compare_half(from_bits((hi << 13) | (rng() & 0x1fffu)));
  }
  // The float range that rounds to float16 subnormals or to the smallest normals, densely.
  for (uint32_t u = 0x33000000u; u < 0x38800000u + (1u << 23); u += 97) {
    compare_half(from_bits(u));
    compare_half(from_bits(u | 0x80000000u));
  }
  for (int i = 0; i < 1000000; ++i) compare_half(from_bits(uint32_t(rng())));

  // bfloat16 keeps the top 16 bits.
  const uint32_t low16[] = {0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff};
  for (uint32_t hi = 0; hi < 65536; ++hi) {
    for (uint32_t lo : low16) compare_bfloat16(from_bits((hi << 16) | lo));
    for (int r = 0; r < 4; ++r) compare_bfloat16(from_bits((hi << 16) | (rng() & 0xffffu)));
  }
  std::printf("rounding sweeps: %s\n", check::failures() == before ? "ok" : "FAILED");
}

// Hand-worked cases. float16: 1 + 2^-10 is the next value after 1 (0x3c01), so 1 + 2^-11
// is a tie between 0x3c00 (even) and 0x3c01; 65504 = 0x7bff is the largest finite value and
// 65520 the tie with 2^16 (infinity, even); 2^-24 = 0x0001 is the smallest subnormal.
void chosen_cases() {
  auto h = [](double v) { return to_half(float(v)).bits; };
  auto b = [](double v) { return to_bfloat16(float(v)).bits; };
  const double p = std::ldexp(1.0, -11);
  CHECK_BITS(h(1.0), uint16_t(0x3c00));
  CHECK_BITS(h(1.0 + p), uint16_t(0x3c00));          // tie -> even (down)
  CHECK_BITS(h(1.0 + 3 * p), uint16_t(0x3c02));      // tie between 0x3c01 and 0x3c02 -> even (up)
  CHECK_BITS(h(1.0 + 5 * p), uint16_t(0x3c02));      // tie between 0x3c02 and 0x3c03 -> even (down)
  CHECK_BITS(h(1.0 + p + std::ldexp(1.0, -23)), uint16_t(0x3c01));  // just above the tie
  CHECK_BITS(h(1.0 + p - std::ldexp(1.0, -23)), uint16_t(0x3c00));  // just below the tie
  CHECK_BITS(h(-(1.0 + 3 * p)), uint16_t(0xbc02));
  CHECK_BITS(h(65504.0), uint16_t(0x7bff));
  CHECK_BITS(h(65519.99), uint16_t(0x7bff));
  CHECK_BITS(h(65520.0), uint16_t(0x7c00));          // tie with 2^16 -> infinity
  CHECK_BITS(h(1e10), uint16_t(0x7c00));
  CHECK_BITS(h(-1e10), uint16_t(0xfc00));
  CHECK_BITS(to_half(std::numeric_limits<float>::infinity()).bits, uint16_t(0x7c00));
  CHECK_BITS(to_half(-std::numeric_limits<float>::infinity()).bits, uint16_t(0xfc00));
  CHECK_BITS(h(0.0), uint16_t(0x0000));
  CHECK_BITS(h(-0.0), uint16_t(0x8000));
  CHECK_BITS(h(std::ldexp(1.0, -24)), uint16_t(0x0001));
  CHECK_BITS(h(std::ldexp(1.0, -25)), uint16_t(0x0000));      // tie between 0 and 2^-24 -> 0
  CHECK_BITS(h(std::ldexp(1.0, -25) * 1.0001), uint16_t(0x0001));
  CHECK_BITS(h(std::ldexp(3.0, -25)), uint16_t(0x0002));      // tie between 1 and 2 -> 2
  CHECK_BITS(h(std::ldexp(5.0, -25)), uint16_t(0x0002));      // tie between 2 and 3 -> 2
  CHECK_BITS(h(-std::ldexp(1.0, -26)), uint16_t(0x8000));     // underflow keeps the sign
  CHECK_BITS(h(std::ldexp(1023.0, -24)), uint16_t(0x03ff));   // largest subnormal
  CHECK_BITS(h(std::ldexp(1023.5, -24)), uint16_t(0x0400));   // tie -> smallest normal (even)
  CHECK_BITS(h(std::ldexp(1.0, -14)), uint16_t(0x0400));
  CHECK_BITS(to_half(from_bits(0x7fc00000u)).bits, uint16_t(0x7e00));   // quiet NaN
  CHECK_BITS(to_half(from_bits(0xffc00000u)).bits, uint16_t(0xfe00));   // negative NaN
  // NaN narrowing keeps the sign and the payload's top 10 bits and sets the quiet bit, as
  // F16C's vcvtps2ph does: a payload below bit 13 leaves the bare quiet NaN.
  CHECK_BITS(to_half(from_bits(0x7f800001u)).bits, uint16_t(0x7e00));
  CHECK_BITS(to_half(from_bits(0x7f802000u)).bits, uint16_t(0x7e01));
  CHECK_BITS(to_half(from_bits(0xffbfe000u)).bits, uint16_t(0xffff));
  CHECK_BITS(to_bits(to_float(half_t{0x7c01})), 0x7fc02000u);   // signalling NaN, quieted
  CHECK_BITS(to_bits(to_float(half_t{0xfdffu})), 0xffffe000u);

  const double q = std::ldexp(1.0, -8);  // bfloat16: 1 + 2^-7 is the next value after 1
  CHECK_BITS(b(1.0), uint16_t(0x3f80));
  CHECK_BITS(b(1.0 + q), uint16_t(0x3f80));          // tie -> even (down)
  CHECK_BITS(b(1.0 + 3 * q), uint16_t(0x3f82));      // tie -> even (up)
  CHECK_BITS(b(1.0 + q + std::ldexp(1.0, -23)), uint16_t(0x3f81));
  CHECK_BITS(b(-(1.0 + 3 * q)), uint16_t(0xbf82));
  CHECK_BITS(to_bfloat16(from_bits(0x7f7f7fffu)).bits, uint16_t(0x7f7f));  // below the tie
  CHECK_BITS(to_bfloat16(from_bits(0x7f7f8000u)).bits, uint16_t(0x7f80));  // tie, odd -> infinity
  CHECK_BITS(to_bfloat16(from_bits(0x7f7e8000u)).bits, uint16_t(0x7f7e));  // tie, even stays
  CHECK_BITS(to_bfloat16(std::numeric_limits<float>::max()).bits, uint16_t(0x7f80));
  CHECK_BITS(to_bfloat16(from_bits(0x00008000u)).bits, uint16_t(0x0000));  // subnormal tie -> 0
  CHECK_BITS(to_bfloat16(from_bits(0x00018000u)).bits, uint16_t(0x0002));  // subnormal tie -> even
  CHECK_BITS(to_bfloat16(from_bits(0x80008001u)).bits, uint16_t(0x8001));
  CHECK_BITS(to_bfloat16(-0.0f).bits, uint16_t(0x8000));
  CHECK_BITS(to_bfloat16(std::numeric_limits<float>::infinity()).bits, uint16_t(0x7f80));
  // NaN stays NaN even when rounding the payload would carry into the exponent.
  const uint16_t bnan = to_bfloat16(from_bits(0x7f80ffffu)).bits;
  CHECK_MSG((bnan & 0x7f80u) == 0x7f80u && (bnan & 0x7fu) != 0, "0x7f80ffff -> 0x%04x", bnan);
  const uint16_t bnan2 = to_bfloat16(from_bits(0x7f800001u)).bits;
  CHECK_MSG((bnan2 & 0x7f80u) == 0x7f80u && (bnan2 & 0x7fu) != 0, "0x7f800001 -> 0x%04x", bnan2);
  CHECK_BITS(to_bfloat16(from_bits(0xffc00000u)).bits, uint16_t(0xffc0));

  // load / store: the kernels' only access path.
  half_t hs{};
  store(hs, 1.0f + float(3 * p));
  CHECK_BITS(hs.bits, uint16_t(0x3c02));
  CHECK_BITS(load<float>(hs), float(1.0 + 4 * p));
  bfloat16_t bs{};
  store(bs, -2.0f);
  CHECK_BITS(bs.bits, uint16_t(0xc000));
  CHECK_BITS(load<float>(bs), -2.0f);
  CHECK_BITS(load<double>(0.1f), double(0.1f));
}

#if defined(__x86_64__) && defined(__GNUC__)
// The x86-64-v3/v4 walks convert float16 with F16C (vcvtph2ps / vcvtps2ph, nearest even); they
// must give to_float / to_half's bits exactly: every half pattern, and floats around every
// rounding position plus random ones.
__attribute__((target("f16c,avx"))) void f16c_narrow8(const uint32_t* u) {
  alignas(32) float in[8];
  alignas(16) uint16_t out[8];
  for (int j = 0; j < 8; ++j) in[j] = from_bits(u[j]);
  _mm_store_si128(reinterpret_cast<__m128i*>(out),
                  _mm256_cvtps_ph(_mm256_load_ps(in), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (int j = 0; j < 8; ++j)
    CHECK_MSG(out[j] == to_half(in[j]).bits, "vcvtps2ph(0x%08x) = 0x%04x, to_half 0x%04x", u[j], out[j],
              to_half(in[j]).bits);
}

__attribute__((target("f16c,avx"))) void f16c_agreement() {
  if (!__builtin_cpu_supports("f16c")) {
    std::printf("f16c agreement: skipped (no F16C)\n");
    return;
  }
  const int before = check::failures();
  for (uint32_t h = 0; h < 65536; h += 8) {
    alignas(16) uint16_t in[8];
    alignas(32) float out[8];
    for (uint32_t j = 0; j < 8; ++j) in[j] = uint16_t(h + j);
    _mm256_store_ps(out, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(in))));
    for (int j = 0; j < 8; ++j)
      CHECK_MSG(to_bits(out[j]) == to_bits(to_float(half_t{in[j]})), "vcvtph2ps(0x%04x) = 0x%08x, to_float 0x%08x",
                in[j], to_bits(out[j]), to_bits(to_float(half_t{in[j]})));
  }
  std::mt19937 rng(777);
  const uint32_t low13[] = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff};
  for (uint32_t hi = 0; hi < (1u << 19); ++hi) {
    uint32_t u[8];
    for (int j = 0; j < 8; ++j) u[j] = (hi << 13) | (j < 6 ? low13[j] : (rng() & 0x1fffu));
    f16c_narrow8(u);
  }
  for (int i = 0; i < 200000; ++i) {
    uint32_t u[8];
    for (auto& x : u) x = uint32_t(rng());
    f16c_narrow8(u);
  }
  std::printf("f16c agreement: %s\n", check::failures() == before ? "ok" : "FAILED");
}
#else
void f16c_agreement() {}
#endif

}  // namespace

int main() {
  f16c_agreement();
  half_exhaustive();
  bfloat16_exhaustive();
  chosen_cases();
  rounding_sweeps();
  return check::finish("test_dtype");
}
