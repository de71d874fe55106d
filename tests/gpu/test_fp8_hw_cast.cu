// The hardware FP8 cast (src/cuda/device/fp8_cast.cuh) against the CPU numerics
// (src/core/numerics.hpp), bit for bit: every bf16 input times representative scales (power-of-two
// ones take the multiply path, others the division), and every e4m3 boundary, tie, subnormal, NaN,
// infinity and saturation case through both paths.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/numerics.hpp"
#include "cuda/device/fp8_cast.cuh"
#include "support/gpu.hpp"
#include "support/multirank.hpp"

namespace epcomm {
namespace {

// out[i] = e4m3(in[i] / scale) through fp8_quantize_x4 (so the pairing and byte order are tested too);
// uses_multiply = whether Fp8Scale chose the reciprocal.
__global__ void quantize_kernel(const float* in, int64_t count, float scale, uint8_t* out, int* uses_multiply) {
  const cuda::device::Fp8Scale s = cuda::device::Fp8Scale::of(scale);
  if (blockIdx.x == 0 && threadIdx.x == 0) *uses_multiply = s.inverse != 0.0f;
  for (int64_t i = 4 * (int64_t(blockIdx.x) * blockDim.x + threadIdx.x); i < count;
       i += 4 * int64_t(gridDim.x) * blockDim.x) {
    const float v[4] = {in[i], in[i + 1], in[i + 2], in[i + 3]};
    const uint32_t word = cuda::device::fp8_quantize_x4(v, s);
    for (int b = 0; b < 4; ++b) out[i + b] = static_cast<uint8_t>(word >> (8 * b));
  }
}

float float_of(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct DeviceCast {
  float* in = nullptr;
  uint8_t* out = nullptr;
  int* flag = nullptr;
  int64_t capacity = 0;

  explicit DeviceCast(int64_t count) : capacity(count) {
    EXPECT_EQ(cudaMalloc(&in, count * sizeof(float)), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&out, count), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&flag, sizeof(int)), cudaSuccess);
  }
  ~DeviceCast() {
    cudaFree(in);
    cudaFree(out);
    cudaFree(flag);
  }

  // Returns the device's bytes; `multiply` says which path it took.
  std::vector<uint8_t> run(const std::vector<float>& values, float scale, bool& multiply) {
    EXPECT_EQ(values.size() % 4, 0u);
    EXPECT_LE(int64_t(values.size()), capacity);
    EXPECT_EQ(cudaMemcpy(in, values.data(), values.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    EXPECT_EQ(cudaMemset(out, 0xA5, values.size()), cudaSuccess);
    quantize_kernel<<<64, 256>>>(in, int64_t(values.size()), scale, out, flag);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint8_t> bytes(values.size());
    int used = -1;
    EXPECT_EQ(cudaMemcpy(bytes.data(), out, bytes.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(&used, flag, sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    multiply = used == 1;
    return bytes;
  }
};

bool is_power_of_two(float scale) {
  uint32_t bits;
  std::memcpy(&bits, &scale, 4);
  return (bits & 0x7FFFFFu) == 0;
}

// Compares the device bytes with numerics::fp8_quantize for every value; stops at 10 mismatches.
void expect_same(const std::vector<float>& values, float scale, const std::vector<uint8_t>& got) {
  int mismatches = 0;
  for (size_t i = 0; i < values.size() && mismatches < 10; ++i) {
    const uint8_t want = numerics::fp8_quantize(values[i], scale);
    if (got[i] == want) continue;
    ++mismatches;
    uint32_t bits;
    std::memcpy(&bits, &values[i], 4);
    ADD_FAILURE() << "value " << values[i] << " (0x" << std::hex << bits << ") / scale " << scale << ": GPU 0x"
                  << int(got[i]) << ", CPU 0x" << int(want);
  }
}

// Scales of SPEC §4.1 for a range of block maxima, exact and rounded (powers of two), plus edges.
std::vector<float> representative_scales() {
  std::vector<float> scales = {1.0f, 0.5f, std::ldexp(1.0f, -20), std::ldexp(1.0f, 12), 1.0000001f, 0.9999999f};
  for (float amax : {0.0f, 1e-5f, 1e-4f, 3e-3f, 0.37f, 1.0f, 3.14159f, 447.9f, 448.0f, 1000.0f, 65504.0f, 3e38f})
    for (bool round_scale : {false, true}) scales.push_back(numerics::fp8_scale(amax, round_scale));
  return scales;
}

TEST(Fp8HardwareCast, EveryBf16InputTimesRepresentativeScales) {
  EPCOMM_REQUIRE_GPUS(1);
  testing::run_ranks(1, [](Bootstrap&) {
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    std::vector<float> values(1 << 16);
    for (uint32_t b = 0; b < values.size(); ++b) values[b] = numerics::bf16_to_float(static_cast<uint16_t>(b));
    DeviceCast cast(int64_t(values.size()));
    int multiplied = 0;
    for (float scale : representative_scales()) {
      SCOPED_TRACE(::testing::Message() << "scale " << scale);
      bool multiply = false;
      const std::vector<uint8_t> got = cast.run(values, scale, multiply);
      EXPECT_EQ(multiply, is_power_of_two(scale)) << "the multiply path is for power-of-two scales only";
      multiplied += multiply;
      expect_same(values, scale, got);
    }
    EXPECT_GT(multiplied, 4) << "the multiply path was not exercised";
  });
}

// Every finite e4m3 value, every midpoint (the ties) and their float neighbours, in both signs,
// plus subnormal floats, saturation, infinities and NaNs of both signs.
std::vector<float> e4m3_edge_cases() {
  std::vector<float> values;
  auto around = [&](double v) {
    const float c = static_cast<float>(v);
    for (float f : {std::nextafter(std::nextafter(c, 0.0f), 0.0f), std::nextafter(c, 0.0f), c,
                    std::nextafter(c, INFINITY), std::nextafter(std::nextafter(c, INFINITY), INFINITY)})
      values.insert(values.end(), {f, -f});
  };
  for (int code = 0; code <= 0x7E; ++code) {
    const double here = numerics::e4m3_to_float(static_cast<uint8_t>(code));
    const double next = code < 0x7E ? numerics::e4m3_to_float(static_cast<uint8_t>(code + 1)) : 480.0;
    around(here);
    around((here + next) / 2);
  }
  for (double v : {448.0, 464.0, 480.0, 500.0, 1e6, 3.4e38, 1e-30, std::ldexp(1.0, -10), std::ldexp(3.0, -11)})
    around(v);
  values.insert(values.end(),
                {0.0f, -0.0f, INFINITY, -INFINITY, std::numeric_limits<float>::denorm_min(),
                 -std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(), float_of(0x7FC00000u),
                 float_of(0xFFC00000u), float_of(0x7F800001u), float_of(0xFFBFFFFFu)});
  while (values.size() % 4 != 0) values.push_back(1.0f);
  return values;
}

TEST(Fp8HardwareCast, E4m3EdgeCasesThroughBothPaths) {
  EPCOMM_REQUIRE_GPUS(1);
  testing::run_ranks(1, [](Bootstrap&) {
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    const std::vector<float> values = e4m3_edge_cases();
    DeviceCast cast(int64_t(values.size()));
    for (float scale : {1.0f, 1.0000001f, 0.25f, 0.3f}) {
      SCOPED_TRACE(::testing::Message() << "scale " << scale);
      bool multiply = false;
      expect_same(values, scale, cast.run(values, scale, multiply));
    }
  });
}

}  // namespace
}  // namespace epcomm
