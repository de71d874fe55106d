// Test support for low-latency mode (SPEC §4): per-rank inputs regenerated from seeds, a naive
// single-process reference computed from every rank's inputs, and checks of a rank's outputs
// against it. The reference uses reference_numerics.hpp, never src/core/numerics.hpp.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "epcomm/buffer.hpp"
#include "reference_numerics.hpp"

namespace epcomm::testing {

enum class RecvFormat { kBf16, kFp8, kFp8RoundScale, kFp8Ue8m0 };

inline const char* name_of(RecvFormat f) {
  switch (f) {
    case RecvFormat::kBf16:
      return "bf16";
    case RecvFormat::kFp8:
      return "fp8";
    case RecvFormat::kFp8RoundScale:
      return "fp8_round";
    case RecvFormat::kFp8Ue8m0:
      return "fp8_ue8m0";
  }
  return "?";
}

enum class Routing {
  kRandom,          // random experts, ~15% -1 slots, ~15% slots repeating an earlier expert of the row
  kAllToOneExpert,  // every token of every rank names one expert (in slot 0 and again in slot K-1)
};

struct LowLatencyCase {
  int num_ranks = 1;
  int max_tokens = 1;  // T_max
  int hidden = 128;
  int num_experts = 1;
  int num_topk = 1;
  std::vector<int> tokens;  // T of each rank, <= T_max
  Routing routing = Routing::kRandom;
  uint64_t seed = 1;

  int num_local_experts() const { return num_experts / num_ranks; }
  int64_t rows() const { return int64_t(num_ranks) * max_tokens; }  // R * T_max
  std::string name() const {
    std::ostringstream out;
    out << "R" << num_ranks << "_Tmax" << max_tokens << "_h" << hidden << "_E" << num_experts << "_K" << num_topk
        << (routing == Routing::kAllToOneExpert ? "_one_expert" : "") << "_s" << seed;
    return out.str();
  }
};

// One rank's inputs.
struct RankInputs {
  int num_tokens = 0;
  std::vector<uint16_t> x;          // [T, hidden] bf16, never zero
  std::vector<int64_t> topk_idx;    // [T, K]
  std::vector<float> topk_weights;  // [T, K], never zero
};

inline std::mt19937_64 rng_for(uint64_t seed, uint64_t stream) { return std::mt19937_64(seed * 1000003 + stream); }

// Tokens of varied magnitude per 128-channel block (2^-24 .. 2^8, some under the 1e-4 amax floor).
inline RankInputs make_inputs(const LowLatencyCase& c, int rank) {
  RankInputs in;
  in.num_tokens = c.tokens.at(rank);
  const int T = in.num_tokens, K = c.num_topk;
  auto rng = rng_for(c.seed, rank);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-24, 8);
  in.x.resize(int64_t(T) * c.hidden);
  for (int t = 0; t < T; ++t) {
    for (int g = 0; g < c.hidden / 128; ++g) {
      const float magnitude = std::ldexp(1.0f, exponent(rng));
      for (int i = 0; i < 128; ++i) {
        uint16_t v = ref::bf16_round(normal(rng) * magnitude);
        if ((v & 0x7FFF) == 0) v = ref::bf16_round(magnitude);
        in.x[int64_t(t) * c.hidden + g * 128 + i] = v;
      }
    }
  }
  std::uniform_int_distribution<int> expert(0, c.num_experts - 1);
  std::uniform_real_distribution<float> chance(0.0f, 1.0f);
  std::uniform_real_distribution<float> weight(0.05f, 1.5f);
  const int one_expert = int(c.seed % c.num_experts);
  in.topk_idx.resize(int64_t(T) * K);
  in.topk_weights.resize(int64_t(T) * K);
  for (int t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      int64_t& id = in.topk_idx[int64_t(t) * K + k];
      if (c.routing == Routing::kAllToOneExpert) {
        id = (k == 0 || k == K - 1) ? one_expert : -1;
      } else {
        const float u = chance(rng);
        if (u < 0.15f) {
          id = -1;
        } else if (u < 0.30f && k > 0) {
          id = in.topk_idx[int64_t(t) * K + std::uniform_int_distribution<int>(0, k - 1)(rng)];
        } else {
          id = expert(rng);
        }
      }
      in.topk_weights[int64_t(t) * K + k] = (chance(rng) < 0.5f ? -1.0f : 1.0f) * weight(rng);
    }
  }
  return in;
}

// What expert `expert` outputs for token `token` of rank `source`: what the tests' "experts" write
// into combine's x, a function of the row's identity so a misrouted row gives a wrong sum.
inline uint16_t expert_output(uint64_t seed, int expert, int source, int token, int h) {
  uint64_t z = seed ^ (uint64_t(expert) << 48) ^ (uint64_t(source) << 32) ^ (uint64_t(token) << 16) ^ uint64_t(h);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float unit = float(z >> 40) / float(1 << 24);  // [0, 1)
  const float value = (unit - 0.5f) * 8.0f;
  const uint16_t bits = ref::bf16_round(value);
  return (bits & 0x7FFF) == 0 ? uint16_t(0x3F80) : bits;  // never zero
}

// Rows of each local expert of `rank`: (source rank, source token), SPEC §4.1's order.
using ExpectedRows = std::vector<std::vector<std::pair<int, int>>>;

inline ExpectedRows expected_dispatch(const LowLatencyCase& c, const std::vector<RankInputs>& all, int rank,
                                      const std::vector<bool>& masked) {
  const int L = c.num_local_experts();
  ExpectedRows rows(L);
  for (int l = 0; l < L; ++l) {
    const int expert = rank * L + l;
    for (int source = 0; source < c.num_ranks; ++source) {
      if (masked[source]) continue;
      const RankInputs& in = all[source];
      for (int t = 0; t < in.num_tokens; ++t) {
        bool names = false;
        for (int k = 0; k < c.num_topk; ++k) names |= in.topk_idx[int64_t(t) * c.num_topk + k] == expert;
        if (names) rows[l].push_back({source, t});
      }
    }
  }
  return rows;
}

// combined_x of `rank`: acc = 0; for k ascending: acc = fmaf(w, out(t, e), acc); bf16 once.
inline std::vector<uint16_t> expected_combine(const LowLatencyCase& c, const RankInputs& in, int rank,
                                              const std::vector<bool>& masked) {
  std::vector<uint16_t> out(int64_t(in.num_tokens) * c.hidden);
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int h = 0; h < c.hidden; ++h) {
      float acc = 0.0f;
      for (int k = 0; k < c.num_topk; ++k) {
        const int64_t e = in.topk_idx[int64_t(t) * c.num_topk + k];
        if (e == -1 || masked[e / c.num_local_experts()]) continue;
        const float row = float(ref::bf16_value(expert_output(c.seed, int(e), rank, t, h)));
        acc = std::fmaf(in.topk_weights[int64_t(t) * c.num_topk + k], row, acc);
      }
      out[int64_t(t) * c.hidden + h] = ref::bf16_round(acc);
    }
  }
  return out;
}

// An allocator whose memory starts as 0xA5 bytes, so that untouched rows can be recognised.
class PoisonAllocator final : public Allocator {
 public:
  static constexpr uint8_t kPoison = 0xA5;
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) override {
    Tensor t = default_allocator().allocate(dtype, shape, device, stream);
    std::memset(t.data, kPoison, t.nbytes());
    return t;
  }
};

inline bool all_poison(const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < bytes; ++i)
    if (p[i] != PoisonAllocator::kPoison) return false;
  return true;
}

inline LowLatencyDispatchInputs dispatch_inputs(const LowLatencyCase& c, RankInputs& in, RecvFormat format) {
  LowLatencyDispatchInputs d;
  d.x = TensorView::contiguous(in.x.data(), DType::kBFloat16, {in.num_tokens, c.hidden}, Device::cpu());
  d.topk_idx = TensorView::contiguous(in.topk_idx.data(), DType::kInt64, {in.num_tokens, c.num_topk}, Device::cpu());
  d.num_max_dispatch_tokens_per_rank = c.max_tokens;
  d.num_experts = c.num_experts;
  d.use_fp8 = format != RecvFormat::kBf16;
  d.round_scale = format == RecvFormat::kFp8RoundScale || format == RecvFormat::kFp8Ue8m0;
  d.use_ue8m0 = format == RecvFormat::kFp8Ue8m0;
  return d;
}

// The reference FP8 cast of one token row: e4m3 bytes [hidden] and scales [hidden / 128].
inline void reference_cast(const uint16_t* row, int hidden, bool round_scale, std::vector<uint8_t>& values,
                           std::vector<float>& scales) {
  values.resize(hidden);
  scales.resize(hidden / 128);
  for (int g = 0; g < hidden / 128; ++g) {
    float amax = 0.0f;
    for (int i = 0; i < 128; ++i) amax = std::fmax(amax, std::fabs(float(ref::bf16_value(row[g * 128 + i]))));
    scales[g] = ref::fp8_scale(amax, round_scale);
    for (int i = 0; i < 128; ++i)
      values[g * 128 + i] = ref::fp8_quantize(float(ref::bf16_value(row[g * 128 + i])), scales[g]);
  }
}

// Checks every output of one rank's dispatch against the reference; rows past recv_count must still
// hold the poison (the outputs must come from PoisonAllocator).
inline void check_dispatch(const LowLatencyCase& c, const std::vector<RankInputs>& all, int rank, RecvFormat format,
                           const LowLatencyDispatchResult& result, const std::vector<bool>& masked) {
  SCOPED_TRACE(c.name() + " " + name_of(format) + " rank " + std::to_string(rank));
  const int L = c.num_local_experts(), R = c.num_ranks, H = c.hidden;
  const int64_t rows = c.rows();
  const ExpectedRows expected = expected_dispatch(c, all, rank, masked);
  const auto* recv_count = result.recv_count.data_as<const int32_t>();
  const auto* src_info = result.handle.src_info.data_as<const int32_t>();
  const auto* layout_range = result.handle.layout_range.data_as<const int64_t>();
  ASSERT_EQ(result.handle.num_max_dispatch_tokens_per_rank, c.max_tokens);
  ASSERT_EQ(result.handle.hidden, H);
  ASSERT_EQ(result.handle.num_experts, c.num_experts);
  std::vector<uint8_t> values;
  std::vector<float> scales;
  for (int l = 0; l < L; ++l) {
    const int count = int(expected[l].size());
    ASSERT_EQ(recv_count[l], count) << "local expert " << l;
    int begin = 0;
    for (int source = 0; source < R; ++source) {
      int from_source = 0;
      for (auto [s, t] : expected[l]) from_source += s == source;
      EXPECT_EQ(layout_range[l * R + source], (int64_t(begin) << 32) | from_source)
          << "layout_range[" << l << ", " << source << "]";
      begin += from_source;
    }
    for (int row = 0; row < count; ++row) {
      const auto [source, token] = expected[l][row];
      ASSERT_EQ(src_info[l * rows + row], token)
          << "expert " << l << " row " << row << " should be token " << token << " of rank " << source;
      const uint16_t* x = &all[source].x[int64_t(token) * H];
      if (format == RecvFormat::kBf16) {
        ASSERT_EQ(std::memcmp(result.recv_x.data_as<const uint16_t>() + (l * rows + row) * H, x, 2 * H), 0)
            << "expert " << l << " row " << row << " should be token " << token << " of rank " << source;
        continue;
      }
      reference_cast(x, H, format != RecvFormat::kFp8, values, scales);
      ASSERT_EQ(std::memcmp(result.recv_x.data_as<const uint8_t>() + (l * rows + row) * H, values.data(), H), 0)
          << "fp8 values of expert " << l << " row " << row << " (token " << token << " of rank " << source << ")";
      const TensorView& s = *result.recv_x_scales;
      for (int g = 0; g < H / 128; ++g) {
        if (format == RecvFormat::kFp8Ue8m0) {
          if (g % 4 != 0) continue;
          uint32_t packed = 0;
          for (int i = 0; i < 4; ++i) packed |= uint32_t(ref::ue8m0(scales[g + i])) << (8 * i);
          const int32_t got = s.data_as<const int32_t>()[l * s.stride(0) + row * s.stride(1) + (g / 4) * s.stride(2)];
          ASSERT_EQ(uint32_t(got), packed) << "ue8m0 scales " << g / 4 << " of expert " << l << " row " << row;
        } else {
          const float got = s.data_as<const float>()[l * s.stride(0) + row * s.stride(1) + g * s.stride(2)];
          ASSERT_EQ(ref::bits_of_float(got), ref::bits_of_float(scales[g]))
              << "scale " << g << " of expert " << l << " row " << row;
        }
      }
    }
    // Rows past recv_count are left as they were.
    const size_t elem = format == RecvFormat::kBf16 ? 2 : 1;
    const auto* recv_x = static_cast<const uint8_t*>(result.recv_x.data);
    EXPECT_TRUE(all_poison(recv_x + (l * rows + count) * H * elem, (rows - count) * H * elem))
        << "recv_x rows past recv_count of expert " << l << " were written";
    EXPECT_TRUE(all_poison(src_info + l * rows + count, (rows - count) * 4));
  }
}

// Dtypes, shapes and column-major strides of dispatch's outputs (SPEC §4.1).
inline void check_dispatch_shapes(const LowLatencyCase& c, RecvFormat format, const LowLatencyDispatchResult& r) {
  const int64_t L = c.num_local_experts(), rows = c.rows(), H = c.hidden;
  auto shape = [](std::initializer_list<int64_t> dims) {
    return TensorView::contiguous(nullptr, DType::kBFloat16, dims, Device::cpu()).shape_string();
  };
  EXPECT_EQ(r.recv_x.shape_string(), shape({L, rows, H}));
  EXPECT_EQ(r.recv_x.dtype, format == RecvFormat::kBf16 ? DType::kBFloat16 : DType::kFloat8E4M3);
  EXPECT_TRUE(r.recv_x.is_contiguous());
  EXPECT_EQ(r.recv_count.dtype, DType::kInt32);
  EXPECT_EQ(r.recv_count.numel(), L);
  EXPECT_EQ(r.handle.src_info.dtype, DType::kInt32);
  EXPECT_EQ(r.handle.src_info.shape_string(), shape({L, rows}));
  EXPECT_EQ(r.handle.layout_range.dtype, DType::kInt64);
  EXPECT_EQ(r.handle.layout_range.shape_string(), shape({L, c.num_ranks}));
  if (format == RecvFormat::kBf16) {
    EXPECT_FALSE(r.recv_x_scales.has_value());
    return;
  }
  ASSERT_TRUE(r.recv_x_scales.has_value());
  const TensorView& s = *r.recv_x_scales;
  const int64_t S = format == RecvFormat::kFp8Ue8m0 ? H / 512 : H / 128;
  EXPECT_EQ(s.dtype, format == RecvFormat::kFp8Ue8m0 ? DType::kInt32 : DType::kFloat32);
  EXPECT_EQ(s.ndim, 3);
  EXPECT_EQ(s.size(0), L);
  EXPECT_EQ(s.size(1), rows);
  EXPECT_EQ(s.size(2), S);
  EXPECT_EQ(s.stride(0), S * rows);  // allocated [L, S, R*T_max] and transposed
  EXPECT_EQ(s.stride(1), 1);
  EXPECT_EQ(s.stride(2), rows);
}

// Writes what the test's experts output into combine's x [L, R*T_max, hidden] for the rows of
// `dispatched`; rows past recv_count get NaN so that reading them would show.
inline void fill_expert_outputs(const LowLatencyCase& c, int rank, const LowLatencyDispatchResult& dispatched,
                                uint16_t* x) {
  const int L = c.num_local_experts(), R = c.num_ranks, H = c.hidden;
  const int64_t rows = c.rows();
  const auto* src_info = dispatched.handle.src_info.data_as<const int32_t>();
  const auto* layout_range = dispatched.handle.layout_range.data_as<const int64_t>();
  for (int l = 0; l < L; ++l) {
    int64_t filled = 0;
    for (int source = 0; source < R; ++source) {
      const int64_t begin = layout_range[l * R + source] >> 32, count = layout_range[l * R + source] & 0xFFFFFFFF;
      for (int64_t row = begin; row < begin + count; ++row)
        for (int h = 0; h < H; ++h)
          x[(l * rows + row) * H + h] = expert_output(c.seed, rank * L + l, source, src_info[l * rows + row], h);
      filled = begin + count;
    }
    for (int64_t i = filled * H; i < rows * H; ++i) x[l * rows * H + i] = 0x7FC0;
  }
}

inline void check_combine(const LowLatencyCase& c, const RankInputs& in, int rank, const TensorView& combined,
                          const std::vector<bool>& masked) {
  SCOPED_TRACE(c.name() + " rank " + std::to_string(rank));
  ASSERT_EQ(combined.dtype, DType::kBFloat16);
  ASSERT_EQ(combined.size(0), in.num_tokens);
  ASSERT_EQ(combined.size(1), c.hidden);
  const std::vector<uint16_t> expected = expected_combine(c, in, rank, masked);
  const auto* got = combined.data_as<const uint16_t>();
  for (int t = 0; t < in.num_tokens; ++t)
    for (int h = 0; h < c.hidden; ++h)
      ASSERT_EQ(got[int64_t(t) * c.hidden + h], expected[int64_t(t) * c.hidden + h])
          << "combined_x[" << t << ", " << h << "]";
}

inline std::vector<RankInputs> all_inputs(const LowLatencyCase& c) {
  std::vector<RankInputs> all;
  for (int r = 0; r < c.num_ranks; ++r) all.push_back(make_inputs(c, r));
  return all;
}

inline BufferOptions low_latency_options(const LowLatencyCase& c) {
  BufferOptions o;
  o.backend = BackendKind::kCpu;
  o.num_rdma_bytes = low_latency_buffer_size_hint(c.max_tokens, c.hidden, c.num_ranks, c.num_experts);
  o.low_latency_mode = true;
  o.timeout = std::chrono::seconds(60);
  return o;
}

}  // namespace epcomm::testing
