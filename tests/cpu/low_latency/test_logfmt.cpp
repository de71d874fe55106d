// LogFMT (core/logfmt.hpp, docs/LOGFMT.md): the format's own properties against brute-force
// checks, then low-latency combine with use_logfmt=True on the CPU backend against the exact
// reference (calc_diff < 1e-3, SPEC §4.2) and against the exact sum of the decoded rows (bit-exact).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/logfmt.hpp"
#include "reference/low_latency_reference.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

constexpr int kBlock = logfmt::kBlockValues;

// SPEC §4.2: 1 - 2 sum(ab) / sum(a^2 + b^2), in float64.
double calc_diff(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double cross = 0, squares = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = ref::bf16_value(a[i]), y = ref::bf16_value(b[i]);
    cross += x * y;
    squares += x * x + y * y;
  }
  return 1.0 - 2.0 * cross / squares;
}

std::vector<uint16_t> round_trip(const std::vector<uint16_t>& row) {
  std::vector<uint8_t> encoded(logfmt::row_bytes(int64_t(row.size())), 0xA5);
  logfmt::encode_row(row.data(), int64_t(row.size()), encoded.data());
  std::vector<uint16_t> decoded(row.size());
  logfmt::decode_row(encoded.data(), int64_t(row.size()), decoded.data());
  return decoded;
}

std::vector<uint16_t> normal_row(std::mt19937& rng, int hidden, float sigma) {
  std::normal_distribution<float> value(0.0f, sigma);
  std::vector<uint16_t> row(hidden);
  for (uint16_t& v : row) v = ref::bf16_round(value(rng));
  return row;
}

TEST(LogFmt, RowIsAboutTenBitsPerValue) {
  EXPECT_EQ(logfmt::row_bytes(128), 176);    // 160 + 4, padded to 16
  EXPECT_EQ(logfmt::row_bytes(7168), 9184);  // 56 * 164
  EXPECT_LE(logfmt::row_bytes(7168) * 8.0 / 7168, 10.3);
  for (int hidden = 128; hidden <= 16384; hidden += 128) EXPECT_LE(logfmt::row_bytes(hidden), 2 * hidden);
}

TEST(LogFmt, EveryCodeSurvivesPackingAtEveryPosition) {
  std::vector<uint8_t> block(logfmt::kCodeBytesPerBlock, 0);
  for (int code = 0; code < 1024; ++code) {
    for (int j = 0; j < kBlock; ++j) logfmt::store_code(block.data(), j, uint16_t((code + 7 * j) % 1024));
    for (int j = 0; j < kBlock; ++j) ASSERT_EQ(logfmt::load_code(block.data(), j), (code + 7 * j) % 1024) << j;
  }
}

// A block whose magnitudes span at most 510 units (about 4 octaves) is stored exactly.
TEST(LogFmt, NarrowBlocksAreLossless) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> top(0x0100, 0x7F7F);
  std::uniform_int_distribution<int> below(0, 510);
  std::uniform_int_distribution<int> sign(0, 1);
  for (int trial = 0; trial < 2000; ++trial) {
    const int t = top(rng);
    std::vector<uint16_t> row(kBlock);
    for (uint16_t& v : row) v = uint16_t((sign(rng) << 15) | std::max(1, t - below(rng)));
    row[trial % kBlock] = uint16_t(t);
    ASSERT_EQ(round_trip(row), row) << "trial " << trial << " top 0x" << std::hex << t;
  }
}

// Brute force: the step is the finest 2^s (s <= 3) whose 510 steps below the block's top reach its
// smallest non-zero value; each value decodes to the level top - n * 2^s nearest to it in magnitude
// units (ties to the smaller magnitude), and to zero when that level is n > 510 or not above 0.
TEST(LogFmt, EachValueTakesTheNearestLevel) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    const float sigma = std::ldexp(1.0f, trial % 40 - 20);
    std::vector<uint16_t> row = normal_row(rng, kBlock, sigma);
    if (trial % 3 == 0) row[5] = ref::bf16_round(sigma * 1e-7f);  // forces the coarsest step
    if (trial % 3 == 1) row[5] = ref::bf16_round(sigma * 1e-3f);
    int top = 0, smallest = 0x7FFF;
    for (uint16_t v : row) {
      if ((v & 0x7FFF) == 0) continue;
      top = std::max(top, int(v & 0x7FFF));
      smallest = std::min(smallest, int(v & 0x7FFF));
    }
    int shift = 3;
    for (int s = 2; s >= 0; --s)
      if (top - smallest + (s > 0 ? 1 << (s - 1) : 0) < (511 << s)) shift = s;
    const std::vector<uint16_t> decoded = round_trip(row);
    for (int j = 0; j < kBlock; ++j) {
      const int magnitude = row[j] & 0x7FFF;
      int nearest = 0;                // n of the nearest level top - n * 2^s, ties to the larger n
      for (int n = 0; n <= 600; ++n)  // past 510 every level means zero
        if (std::abs(top - (n << shift) - magnitude) <= std::abs(top - (nearest << shift) - magnitude)) nearest = n;
      const int best = magnitude == 0 || nearest > 510 ? 0 : std::max(0, top - (nearest << shift));
      const uint16_t expected = best == 0 ? uint16_t(0) : uint16_t((row[j] & 0x8000) | best);
      ASSERT_EQ(decoded[j], expected) << "trial " << trial << " value 0x" << std::hex << row[j] << " top 0x" << top
                                      << " shift " << shift;
    }
  }
}

TEST(LogFmt, SpecialValues) {
  std::vector<uint16_t> row(kBlock, 0x3F80);  // 1.0
  row[0] = 0x0000;                            // +0
  row[1] = 0x8000;                            // -0
  row[2] = 0x7FC0;                            // NaN
  row[3] = 0x7F80;                            // +Inf
  row[4] = 0xFF80;                            // -Inf
  row[5] = 0x0001;                            // the smallest subnormal: far below 1.0, flushed
  row[6] = 0xBF80;                            // -1.0
  const std::vector<uint16_t> decoded = round_trip(row);
  EXPECT_EQ(decoded[0], 0);
  EXPECT_EQ(decoded[1], 0);
  for (int j : {2, 3, 4}) EXPECT_EQ(decoded[j], logfmt::kDecodedNan) << j;
  EXPECT_EQ(decoded[5], 0);
  EXPECT_EQ(decoded[6], 0xBF80);
  EXPECT_EQ(decoded[7], 0x3F80);
  EXPECT_EQ(round_trip(std::vector<uint16_t>(2 * kBlock, 0)), std::vector<uint16_t>(2 * kBlock, 0));
}

// The metadata word: top in bits 0..14, the step shift in bits 16..17 (docs/LOGFMT.md).
TEST(LogFmt, MetadataWordLayout) {
  std::vector<uint16_t> row(kBlock, 0x4000);  // 2.0: one magnitude, shift 0
  row[9] = 0x4180;                            // 16.0 is the top, 0x180 units above
  std::vector<uint8_t> encoded(logfmt::row_bytes(kBlock));
  logfmt::encode_row(row.data(), kBlock, encoded.data());
  const uint8_t* meta = encoded.data() + logfmt::kCodeBytesPerBlock;
  EXPECT_EQ(meta[0] | (meta[1] << 8), 0x4180);
  EXPECT_EQ(meta[2], 0);
  EXPECT_EQ(logfmt::load_code(encoded.data(), 9), 511);
  EXPECT_EQ(logfmt::load_code(encoded.data(), 0), 511 - 0x180);
  row[0] = 0xB580;  // -2^-20: 0xC00 units below top needs shift 3
  logfmt::encode_row(row.data(), kBlock, encoded.data());
  EXPECT_EQ(meta[2], 3);
  EXPECT_EQ(logfmt::load_code(encoded.data(), 0), 0x200 | (511 - 0xC00 / 8));
  row[0] = 0x3A00;  // 2^-11: 0x780 units below top needs shift 2
  logfmt::encode_row(row.data(), kBlock, encoded.data());
  EXPECT_EQ(meta[2], 2);
}

TEST(LogFmt, RandomRowsStayWithinCalcDiff) {
  std::mt19937 rng(3);
  for (float sigma : {1e-3f, 0.5f, 1.0f, 30.0f}) {
    const std::vector<uint16_t> row = normal_row(rng, 7168, sigma);
    EXPECT_LT(calc_diff(round_trip(row), row), 1e-4) << "sigma " << sigma;
  }
}

// ---- low-latency combine with use_logfmt on the CPU backend ----------------------------------

// The exact SPEC §4.2 sum over the rows as LogFMT delivers them.
std::vector<uint16_t> expected_logfmt_combine(const LowLatencyCase& c, const RankInputs& in, int rank) {
  std::vector<uint16_t> out(int64_t(in.num_tokens) * c.hidden);
  std::vector<uint16_t> row(c.hidden);
  for (int t = 0; t < in.num_tokens; ++t) {
    std::vector<float> acc(c.hidden, 0.0f);
    for (int k = 0; k < c.num_topk; ++k) {
      const int64_t e = in.topk_idx[int64_t(t) * c.num_topk + k];
      if (e == -1) continue;
      for (int h = 0; h < c.hidden; ++h) row[h] = expert_output(c.seed, int(e), rank, t, h);
      const std::vector<uint16_t> delivered = round_trip(row);
      for (int h = 0; h < c.hidden; ++h)
        acc[h] = std::fmaf(in.topk_weights[int64_t(t) * c.num_topk + k], float(ref::bf16_value(delivered[h])), acc[h]);
    }
    for (int h = 0; h < c.hidden; ++h) out[int64_t(t) * c.hidden + h] = ref::bf16_round(acc[h]);
  }
  return out;
}

struct Combined {
  std::vector<uint16_t> out;
};

// Dispatch (bf16) then combine of the test's expert outputs; `use_logfmt` per rank.
Combined dispatch_and_combine(Buffer& buffer, const LowLatencyCase& c, std::vector<RankInputs>& all, int rank,
                              bool use_logfmt) {
  RankInputs& in = all[rank];
  LowLatencyDispatchInputs d = dispatch_inputs(c, in, RecvFormat::kBf16);
  const LowLatencyDispatchResult r = buffer.low_latency_dispatch(d);
  std::vector<uint16_t> x(c.num_local_experts() * c.rows() * c.hidden);
  fill_expert_outputs(c, rank, r, x.data());
  LowLatencyCombineInputs ci;
  ci.x = TensorView::contiguous(x.data(), DType::kBFloat16, {c.num_local_experts(), c.rows(), c.hidden}, Device::cpu());
  ci.topk_idx = d.topk_idx;
  ci.topk_weights =
      TensorView::contiguous(in.topk_weights.data(), DType::kFloat32, {in.num_tokens, c.num_topk}, Device::cpu());
  ci.handle = &r.handle;
  ci.use_logfmt = use_logfmt;
  const LowLatencyCombineResult result = buffer.low_latency_combine(ci);
  const auto* data = result.combined_x.data_as<const uint16_t>();
  return {std::vector<uint16_t>(data, data + int64_t(in.num_tokens) * c.hidden)};
}

class LowLatencyLogFmt : public ::testing::TestWithParam<LowLatencyCase> {};

TEST_P(LowLatencyLogFmt, CloseToExactAndEqualToTheDecodedSum) {
  const LowLatencyCase c = GetParam();
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    std::vector<RankInputs> all = all_inputs(c);
    const Combined first = dispatch_and_combine(buffer, c, all, rank, true);
    const Combined again = dispatch_and_combine(buffer, c, all, rank, true);
    EXPECT_EQ(first.out, again.out) << "use_logfmt results differ between runs";
    EXPECT_EQ(first.out, expected_logfmt_combine(c, all[rank], rank)) << "rank " << rank;
    if (all[rank].num_tokens > 0) {
      const std::vector<uint16_t> exact = expected_combine(c, all[rank], rank, std::vector<bool>(c.num_ranks, false));
      EXPECT_LT(calc_diff(first.out, exact), 1e-3) << "rank " << rank;
      EXPECT_NE(first.out, exact) << "LogFMT is lossy on these rows: equal results mean it did not run";
    }
    buffer.destroy();
  });
}

INSTANTIATE_TEST_SUITE_P(Sizes, LowLatencyLogFmt,
                         ::testing::Values(LowLatencyCase{1, 9, 256, 4, 4, {9}, Routing::kRandom, 61},
                                           LowLatencyCase{2, 17, 2048, 8, 8, {17, 5}, Routing::kRandom, 62},
                                           LowLatencyCase{4, 8, 512, 16, 9, {8, 0, 3, 8}, Routing::kRandom, 63}),
                         [](const auto& info) { return info.param.name(); });

// Every rank must agree on use_logfmt: the wire format is part of the call.
TEST(LowLatencyLogFmtErrors, RanksThatDisagreeFailTogether) {
  const LowLatencyCase c{2, 4, 128, 4, 2, {4, 4}, Routing::kRandom, 64};
  run_ranks(2, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    std::vector<RankInputs> all = all_inputs(c);
    try {
      dispatch_and_combine(buffer, c, all, rank, rank == 0);
      ADD_FAILURE() << "rank " << rank << ": expected an error, got none";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument) << error.what();
      EXPECT_NE(std::string(error.what()).find("use_logfmt"), std::string::npos) << error.what();
    }
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
