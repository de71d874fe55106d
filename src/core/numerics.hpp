// Number formats and the FP8 cast of SPEC §4.1, written once for the CPU reference and the CUDA
// kernels (every function is __host__ __device__). All rounding is explicit so that both sides
// produce the same bits:
//   bf16  <- float : round to nearest even, NaN -> 0x7FFF (what cvt.rn.bf16.f32 gives)
//   e4m3  <- float : round to nearest even, saturating to +-448 (cvt.rn.satfinite.e4m3x2.f32)
//   scale          : s = max(amax, 1e-4) / 448 (IEEE division); round_scale: the next power of two
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define EPCOMM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EPCOMM_HOST_DEVICE inline
#endif

namespace epcomm::numerics {

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

EPCOMM_HOST_DEVICE uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

EPCOMM_HOST_DEVICE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

EPCOMM_HOST_DEVICE float bf16_to_float(uint16_t bf16) { return bits_float(uint32_t(bf16) << 16); }

EPCOMM_HOST_DEVICE uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;  // NaN
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

EPCOMM_HOST_DEVICE float e4m3_to_float(uint8_t e4m3) {
  const uint32_t sign = uint32_t(e4m3 >> 7) << 31;
  const uint32_t exponent = (e4m3 >> 3) & 0xFu;
  const uint32_t mantissa = e4m3 & 0x7u;
  if (exponent == 0xF && mantissa == 0x7) return bits_float(sign | 0x7FC00000u);  // NaN
  if (exponent == 0) {                                                            // subnormal: m * 2^-9
    return bits_float(sign | float_bits(float(mantissa) * 0.001953125f));
  }
  return bits_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

EPCOMM_HOST_DEVICE uint8_t float_to_e4m3(float value) {
  const uint32_t bits = float_bits(value);
  const uint8_t sign = static_cast<uint8_t>((bits >> 31) << 7);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return sign | 0x7F;           // NaN stays NaN
  if (magnitude >= float_bits(kFp8Max)) return sign | 0x7E;  // saturate (inf too)
  uint32_t exponent = magnitude >> 23;
  if (exponent < 121) {  // below 2^-6: subnormal e4m3, a multiple of 2^-9 (8 * 2^-9 is the smallest normal)
    const float scaled = bits_float(magnitude) * 512.0f;  // exact: a power-of-two scaling
#if defined(__CUDA_ARCH__)
    const uint32_t m = static_cast<uint32_t>(__float2uint_rn(scaled));
#else
    const uint32_t m = static_cast<uint32_t>(__builtin_rintf(scaled));  // default mode: nearest even
#endif
    return sign | static_cast<uint8_t>(m);
  }
  uint32_t kept = (magnitude >> 20) & 0x7u;  // the 3 mantissa bits e4m3 keeps
  const uint32_t rest = magnitude & 0xFFFFFu;
  if (rest > 0x80000u || (rest == 0x80000u && (kept & 1u))) ++kept;
  if (kept == 8) {
    kept = 0;
    ++exponent;
  }
  const uint32_t code = ((exponent - 120u) << 3) | kept;
  return sign | static_cast<uint8_t>(code > 0x7Eu ? 0x7Eu : code);
}

// The scale of one 128-channel block whose largest magnitude is `amax`.
EPCOMM_HOST_DEVICE float fp8_scale(float amax, bool round_scale) {
  amax = amax > kAmaxFloor ? amax : kAmaxFloor;
#if defined(__CUDA_ARCH__)
  const float scale = __fdiv_rn(amax, kFp8Max);
#else
  const float scale = amax / kFp8Max;
#endif
  if (!round_scale) return scale;
  const uint32_t bits = float_bits(scale);
  if ((bits & 0x7FFFFFu) == 0) return scale;     // already a power of two
  return bits_float(((bits >> 23) + 1u) << 23);  // 2^ceil(log2(scale)); scale is positive and normal
}

// One element's FP8 value given its block's scale: e4m3(x / s).
EPCOMM_HOST_DEVICE uint8_t fp8_quantize(float value, float scale) {
#if defined(__CUDA_ARCH__)
  return float_to_e4m3(__fdiv_rn(value, scale));
#else
  return float_to_e4m3(value / scale);
#endif
}

// The exponent byte of a power-of-two scale (UE8M0).
EPCOMM_HOST_DEVICE uint8_t ue8m0_byte(float power_of_two_scale) {
  return static_cast<uint8_t>(float_bits(power_of_two_scale) >> 23);
}

}  // namespace epcomm::numerics
