// The FP8 cast of SPEC §4.1 with the hardware conversion (sm_89+): cvt.rn.satfinite.e4m3x2.f32
// converts two floats per instruction with round-to-nearest-even and saturation to +-448, which is
// what numerics::float_to_e4m3 computes in software. The division x / s is a multiply by 1 / s when
// s is a power of two (round_scale, UE8M0): then 1 / s is exact and x * (1 / s) is the same
// correctly rounded real number as x / s, so the bits do not change. Other scales keep the IEEE
// division (__fdiv_rn).
//
// Proven bit-exact against src/core/numerics.hpp by tests/gpu/test_fp8_hw_cast.cu (every bf16
// input x representative scales, and every e4m3 boundary, tie, subnormal, NaN and saturation case).
// Not wired into the kernels yet.
#pragma once

#include <cstdint>

#include "core/numerics.hpp"

namespace epcomm::cuda::device {

// Two e4m3 bytes: `low` in bits 0..7, `high` in bits 8..15. NaN gives 0x7F whatever its sign (see
// with_nan_signs), +-Inf and |x| >= 464 saturate to +-448.
__device__ __forceinline__ uint16_t e4m3x2_rn_satfinite(float low, float high) {
  uint16_t packed;
  // PTX: the first source goes to the upper half of the result.
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(high), "f"(low));
  return packed;
}

// numerics::float_to_e4m3 keeps a NaN's sign (sign | 0x7F) and the CPU's division keeps the NaN
// of its input; on the GPU both the division and cvt give the canonical NaN (0x7F). Patching the
// sign of a NaN *input* afterwards keeps the two bit-identical on every input (a scale is finite
// and positive, so x / s is NaN exactly when x is).
__device__ __forceinline__ uint16_t with_nan_signs(uint16_t packed, float low, float high) {
  if (isnan(low)) packed = static_cast<uint16_t>((packed & 0xFF00u) | 0x7Fu | ((__float_as_uint(low) >> 24) & 0x80u));
  if (isnan(high))
    packed = static_cast<uint16_t>((packed & 0x00FFu) | 0x7F00u | ((__float_as_uint(high) >> 16) & 0x8000u));
  return packed;
}

// One block's scale prepared for quantizing: the multiply by the reciprocal where it is exact.
struct Fp8Scale {
  float scale;    // s of SPEC §4.1
  float inverse;  // 1 / s when s is a power of two, else 0 (divide instead)

  __device__ __forceinline__ static Fp8Scale of(float scale) {
    const uint32_t bits = __float_as_uint(scale);
    const bool power_of_two = (bits & 0x007FFFFFu) == 0 && (bits >> 23) != 0 && (bits >> 23) < 0xFFu;
    return {scale, power_of_two ? __fdiv_rn(1.0f, scale) : 0.0f};
  }
  __device__ __forceinline__ float apply(float value) const {
    return inverse != 0.0f ? __fmul_rn(value, inverse) : __fdiv_rn(value, scale);
  }
};

// e4m3(x / s) for two values, bit-identical to numerics::fp8_quantize on the CPU for each.
__device__ __forceinline__ uint16_t fp8_quantize_x2(float low, float high, const Fp8Scale& s) {
  return with_nan_signs(e4m3x2_rn_satfinite(s.apply(low), s.apply(high)), low, high);
}

// Four values into one little-endian word (value i in byte i), the layout of recv_x rows.
__device__ __forceinline__ uint32_t fp8_quantize_x4(const float (&v)[4], const Fp8Scale& s) {
  return uint32_t(fp8_quantize_x2(v[0], v[1], s)) | (uint32_t(fp8_quantize_x2(v[2], v[3], s)) << 16);
}

}  // namespace epcomm::cuda::device
