// Independent scalar references for the number formats of SPEC §4 (bf16, e4m3, FP8 scales,
// UE8M0), written from the definitions and deliberately sharing no code with src/core/numerics.hpp:
// values are computed in double and picked by explicit search, not by bit tricks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace epcomm::testing::ref {

inline float float_of_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t bits_of_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// The value of a bf16 pattern from its fields: s.eeeeeeee.mmmmmmm, bias 127.
inline double bf16_value(uint16_t bits) {
  const int exponent = (bits >> 7) & 0xFF, mantissa = bits & 0x7F;
  double magnitude;
  if (exponent == 0xFF) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(double(mantissa), -133);  // subnormal: (m / 128) * 2^-126
  } else {
    magnitude = std::ldexp(1.0 + mantissa / 128.0, exponent - 127);
  }
  return (bits & 0x8000) ? -magnitude : magnitude;
}

// Round to nearest bf16, ties to the even pattern; NaN -> 0x7FFF; overflow rounds to infinity.
inline uint16_t bf16_round(float value) {
  if (std::isnan(value)) return 0x7FFF;
  const uint32_t bits = bits_of_float(value);
  const uint16_t toward_zero = static_cast<uint16_t>(bits >> 16);
  if ((bits & 0xFFFF) == 0) return toward_zero;  // exactly representable (infinities included)
  const uint16_t away = toward_zero + 1;         // next magnitude up (0x7F80 / 0xFF80 = infinity)
  const double magnitude = std::fabs(double(value));
  const double low = std::fabs(bf16_value(toward_zero));
  // The pattern after the largest finite bf16 stands for 2^128 when deciding how to round.
  const double high = (away & 0x7FFF) == 0x7F80 ? std::ldexp(1.0, 128) : std::fabs(bf16_value(away));
  const double below = magnitude - low, above = high - magnitude;
  if (below < above) return toward_zero;
  if (above < below) return away;
  return (toward_zero & 1) == 0 ? toward_zero : away;
}

// The value of an e4m3 (float8_e4m3fn) code: s.eeee.mmm, bias 7, subnormals m * 2^-9, 0x7F NaN.
inline double e4m3_value(uint8_t code) {
  const int exponent = (code >> 3) & 0xF, mantissa = code & 7;
  if ((code & 0x7F) == 0x7F) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude =
      exponent == 0 ? std::ldexp(double(mantissa), -9) : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
  return (code & 0x80) ? -magnitude : magnitude;
}

// Nearest e4m3 by search over every finite code (ties to the even mantissa), saturating to +-448.
inline uint8_t e4m3_round(float value) {
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  if (std::isnan(value)) return sign | 0x7F;
  const double magnitude = std::fabs(double(value));
  if (magnitude >= 448.0) return sign | 0x7E;
  uint8_t best = 0;
  for (uint8_t code = 1; code <= 0x7E; ++code) {
    const double distance = std::fabs(e4m3_value(code) - magnitude);
    const double best_distance = std::fabs(e4m3_value(best) - magnitude);
    if (distance < best_distance || (distance == best_distance && (code & 1) == 0)) best = code;
  }
  return sign | best;
}

// The scale of a 128-channel block: amax floored at 1e-4 (as a float), divided by 448 with one
// rounding to float (division in double is exact enough for that); round_scale: the smallest power
// of two p with p * 448 >= amax, found by exact comparisons.
inline float fp8_scale(float amax, bool round_scale) {
  const float floored = amax > 1e-4f ? amax : 1e-4f;
  if (!round_scale) return static_cast<float>(double(floored) / 448.0);
  double power = 1.0;
  while (power * 448.0 < floored) power *= 2.0;
  while (power / 2.0 * 448.0 >= floored) power /= 2.0;
  return static_cast<float>(power);
}

// e4m3(x / s) with x / s a correctly rounded float division.
inline uint8_t fp8_quantize(float value, float scale) {
  return e4m3_round(static_cast<float>(double(value) / double(scale)));
}

// UE8M0: the biased exponent (bias 127) of a power of two.
inline uint8_t ue8m0(float power_of_two) {
  int exponent = 0;
  const double mantissa = std::frexp(double(power_of_two), &exponent);  // power = 0.5 * 2^exponent
  (void)mantissa;
  return static_cast<uint8_t>(exponent - 1 + 127);
}

}  // namespace epcomm::testing::ref
