// numerics.hpp (the FP8 cast of SPEC §4.1 and the bf16 rounding shared by CPU and GPU) against the
// independent references of reference_numerics.hpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/numerics.hpp"
#include "reference/reference_numerics.hpp"

namespace epcomm {
namespace {

namespace ref = testing::ref;
using ref::bits_of_float;
using ref::float_of_bits;

// Floats around an e4m3 or bf16 boundary value: the value and its float neighbours.
std::vector<float> around(double value) {
  const float center = static_cast<float>(value);
  return {std::nextafter(std::nextafter(center, 0.0f), 0.0f), std::nextafter(center, 0.0f), center,
          std::nextafter(center, INFINITY), std::nextafter(std::nextafter(center, INFINITY), INFINITY)};
}

// Every finite e4m3 value, every midpoint between neighbours (the ties), and their float neighbours,
// in both signs; plus the saturation region and specials.
std::vector<float> e4m3_boundaries() {
  std::vector<float> values;
  for (int code = 0; code <= 0x7E; ++code) {
    const double here = ref::e4m3_value(static_cast<uint8_t>(code));
    const double next = code < 0x7E ? ref::e4m3_value(static_cast<uint8_t>(code + 1)) : 480.0;
    for (double v : {here, (here + next) / 2})
      for (float f : around(v)) values.insert(values.end(), {f, -f});
  }
  for (double v : {std::ldexp(1.0, -10), std::ldexp(1.0, -11), std::ldexp(3.0, -11), 1e-30, 448.0, 464.0, 480.0, 500.0,
                   1e6, 3.4e38})
    for (float f : around(v)) values.insert(values.end(), {f, -f});
  values.insert(values.end(), {0.0f, -0.0f, INFINITY, -INFINITY, std::numeric_limits<float>::denorm_min()});
  return values;
}

TEST(Fp8Cast, E4m3MatchesNearestEvenSearchAtEveryBoundary) {
  for (float value : e4m3_boundaries())
    ASSERT_EQ(numerics::float_to_e4m3(value), ref::e4m3_round(value))
        << "value " << value << " (bits 0x" << std::hex << bits_of_float(value) << ")";
}

TEST(Fp8Cast, E4m3MatchesReferenceOnRandomFloats) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> any_bits;
  std::uniform_real_distribution<float> in_range(-500.0f, 500.0f);
  std::uniform_int_distribution<int> exponent(-14, 9);
  for (int i = 0; i < 200000; ++i) {
    float value;
    switch (i % 3) {
      case 0:
        value = float_of_bits(any_bits(rng));
        break;
      case 1:
        value = in_range(rng);
        break;
      default:
        value = std::ldexp(in_range(rng) / 500.0f, exponent(rng));  // dense around small magnitudes
    }
    if (std::isnan(value)) continue;
    ASSERT_EQ(numerics::float_to_e4m3(value), ref::e4m3_round(value)) << "value " << value;
  }
}

TEST(Fp8Cast, E4m3DecodesEveryCode) {
  for (int code = 0; code < 256; ++code) {
    const double expected = ref::e4m3_value(static_cast<uint8_t>(code));
    const float got = numerics::e4m3_to_float(static_cast<uint8_t>(code));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << code;
    } else {
      EXPECT_EQ(double(got), expected) << "code " << code;
      EXPECT_EQ(std::signbit(got), (code & 0x80) != 0) << "code " << code;
    }
  }
}

TEST(Fp8Cast, E4m3SaturatesAt448AndKeepsNan) {
  EXPECT_EQ(numerics::float_to_e4m3(448.0f), 0x7E);
  EXPECT_EQ(numerics::float_to_e4m3(std::nextafter(448.0f, INFINITY)), 0x7E);
  EXPECT_EQ(numerics::float_to_e4m3(1e30f), 0x7E);
  EXPECT_EQ(numerics::float_to_e4m3(-INFINITY), 0xFE);
  EXPECT_EQ(numerics::float_to_e4m3(NAN) & 0x7F, 0x7F);
  EXPECT_EQ(numerics::float_to_e4m3(std::ldexp(1.0f, -10)), 0x00);  // the tie between 0 and 2^-9 goes to 0
  EXPECT_EQ(numerics::float_to_e4m3(std::ldexp(3.0f, -10)), 0x02);  // between 1 and 2 (x 2^-9): even
}

// Amax values of every binade the scale can see, the floor and its neighbours, exact multiples of
// 448 (where round_scale must not round up) and random ones.
std::vector<float> amax_samples() {
  std::vector<float> values;
  for (int e = -30; e <= 30; ++e) {
    for (float f : around(std::ldexp(1.0, e))) values.push_back(f);
    for (float f : around(448.0 * std::ldexp(1.0, e))) values.push_back(f);
  }
  for (float f : around(1e-4)) values.push_back(f);
  values.insert(values.end(), {0.0f, 1e-30f, 5e-5f, 448.0f, 1.0f, 3.0f});
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  for (int i = 0; i < 100000; ++i) values.push_back(std::ldexp(mantissa(rng), exponent(rng)));
  return values;
}

TEST(Fp8Cast, ScaleMatchesReferenceIncludingFloorAndRounding) {
  for (float amax : amax_samples()) {
    for (bool round_scale : {false, true}) {
      const float expected = ref::fp8_scale(amax, round_scale);
      const float got = numerics::fp8_scale(amax, round_scale);
      ASSERT_EQ(bits_of_float(got), bits_of_float(expected)) << "amax " << amax << " round_scale " << round_scale;
    }
  }
  // The floor: below 1e-4 every amax gives the scale of 1e-4.
  EXPECT_EQ(numerics::fp8_scale(0.0f, false), numerics::fp8_scale(1e-4f, false));
  EXPECT_EQ(numerics::fp8_scale(1e-9f, true), numerics::fp8_scale(1e-4f, true));
}

TEST(Fp8Cast, Ue8m0IsTheExponentByteOfRoundedScales) {
  for (float amax : amax_samples()) {
    const float scale = numerics::fp8_scale(amax, /*round_scale=*/true);
    ASSERT_EQ(numerics::ue8m0_byte(scale), ref::ue8m0(scale)) << "amax " << amax;
  }
  EXPECT_EQ(numerics::ue8m0_byte(1.0f), 127);
  EXPECT_EQ(numerics::ue8m0_byte(0.5f), 126);
}

// A whole 128-channel block: scale from the block's amax, then every value quantized with it.
TEST(Fp8Cast, BlockQuantizationMatchesReference) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-25, 12);
  for (int block = 0; block < 3000; ++block) {
    const float magnitude = std::ldexp(1.0f, exponent(rng));
    std::vector<float> x(128);
    for (float& v : x) v = float_of_bits(uint32_t(ref::bf16_round(normal(rng) * magnitude)) << 16);
    if (block % 10 == 0) x[block % 128] = magnitude * 448.0f;  // amax hits a multiple of 448
    float amax = 0.0f;
    for (float v : x) amax = std::fmax(amax, std::fabs(v));
    for (bool round_scale : {false, true}) {
      const float scale = ref::fp8_scale(amax, round_scale);
      ASSERT_EQ(bits_of_float(numerics::fp8_scale(amax, round_scale)), bits_of_float(scale));
      for (float v : x)
        ASSERT_EQ(numerics::fp8_quantize(v, scale), ref::fp8_quantize(v, scale))
            << "value " << v << " scale " << scale << " round_scale " << round_scale;
    }
  }
}

std::vector<float> bf16_boundaries() {
  std::vector<float> values;
  std::mt19937 rng(5);
  std::uniform_int_distribution<uint32_t> pattern(0, 0xFFFF);
  for (int i = 0; i < 5000; ++i) {
    const uint32_t high = pattern(rng) << 16;
    // The bf16 value itself, the midpoint to the next one (a tie), and their neighbours.
    for (uint32_t low : {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu})
      values.push_back(float_of_bits(high | low));
  }
  for (uint32_t bits : {0x7F7F7FFFu, 0x7F7F8000u, 0x7F7FFFFFu, 0x00008000u, 0x00018000u, 0x80008000u})
    values.push_back(float_of_bits(bits));
  values.insert(values.end(), {0.0f, -0.0f, INFINITY, -INFINITY});
  return values;
}

TEST(Bf16Rounding, MatchesNearestEvenReference) {
  for (float value : bf16_boundaries()) {
    if (std::isnan(value)) continue;
    ASSERT_EQ(numerics::float_to_bf16(value), ref::bf16_round(value))
        << "value " << value << " (bits 0x" << std::hex << bits_of_float(value) << ")";
  }
  std::mt19937 rng(11);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 200000; ++i) {
    const float value = float_of_bits(any_bits(rng));
    if (std::isnan(value)) continue;
    ASSERT_EQ(numerics::float_to_bf16(value), ref::bf16_round(value)) << "bits 0x" << std::hex << bits_of_float(value);
  }
  EXPECT_EQ(numerics::float_to_bf16(NAN), 0x7FFF);
}

TEST(Bf16Rounding, WideningIsExact) {
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const double expected = ref::bf16_value(static_cast<uint16_t>(bits));
    const float got = numerics::bf16_to_float(static_cast<uint16_t>(bits));
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(got));
    } else {
      ASSERT_EQ(double(got), expected) << "bits 0x" << std::hex << bits;
    }
  }
}

}  // namespace
}  // namespace epcomm
