// src/core/semantics.hpp, the pure rules of SPEC §3/§4 that the CPU backend, bench/oracle.cpp and
// tests/reference/normal_reference.* share, against small cases worked out by hand from SPEC (and
// the FP8 block scale against the independent reference_numerics.hpp): so the shared rules are
// checked by something other than their own callers.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "core/semantics.hpp"
#include "reference/reference_numerics.hpp"

namespace epcomm {
namespace {

constexpr uint16_t kBf16One = 0x3F80;         // 1.0
constexpr uint16_t kBf16TwoTo24 = 0x4B80;     // 2^24: float32 adds 1 to it without effect
constexpr uint16_t kBf16MinusTwo24 = 0xCB80;  // -2^24

TEST(Semantics, RoutingFollowsTheExpertsOfEachSlot) {
  // E = 8 over R = 4 ranks: L = 2, rank r holds experts 2r and 2r + 1; -1 slots route nowhere.
  const std::vector<int64_t> token = {5, -1, 0, 4};
  auto expert_at = [&](int k) { return token[k]; };
  const std::vector<bool> expected = {true, false, true, false};
  for (int r = 0; r < 4; ++r) EXPECT_EQ(semantics::token_goes_to_rank(expert_at, 4, 2, r), expected[r]) << "rank " << r;
  // Nodes of G = 2: node 0 = ranks 0, 1; node 1 = ranks 2, 3.
  auto goes_to = [&](int r) { return bool(expected[r]); };
  EXPECT_TRUE(semantics::token_goes_to_node(goes_to, 0, 2));
  EXPECT_TRUE(semantics::token_goes_to_node(goes_to, 1, 2));
  auto only_rank_1 = [](int r) { return r == 1; };
  EXPECT_TRUE(semantics::token_goes_to_node(only_rank_1, 0, 2));
  EXPECT_FALSE(semantics::token_goes_to_node(only_rank_1, 1, 2));
  EXPECT_TRUE(semantics::token_selects_expert(expert_at, 4, 4));
  EXPECT_FALSE(semantics::token_selects_expert(expert_at, 4, 1));
}

TEST(Semantics, RowsAreGroupedBySourceRankThenTokenIndex) {
  // sent[i][j]: rank i sends 1, 2 tokens to ranks 0, 1; rank 1 sends 3, 4.
  const int sent[2][2] = {{1, 2}, {3, 4}};
  const std::vector<int32_t> prefix = semantics::rank_prefix_matrix([&](int i, int j) { return sent[i][j]; }, 2);
  EXPECT_EQ(prefix, (std::vector<int32_t>{1, 2, 4, 6}));
  EXPECT_EQ(semantics::first_row_from(prefix, 2, 0, 0), 0);
  EXPECT_EQ(semantics::first_row_from(prefix, 2, 1, 0), 1);
  EXPECT_EQ(semantics::first_row_from(prefix, 2, 1, 1), 2);
  EXPECT_EQ(semantics::recv_rank_prefix_sum(prefix, 2, 1), (std::vector<int32_t>{2, 6}));
  // Rank 1's three tokens: t0 to both ranks, t1 to rank 1, t2 to rank 0. Its rows start after rank 0's.
  const bool goes[3][2] = {{true, true}, {false, true}, {true, false}};
  const std::vector<int32_t> rows =
      semantics::send_rows([&](int t, int r) { return goes[t][r]; }, prefix, /*num_tokens=*/3, /*num_ranks=*/2, 1);
  EXPECT_EQ(rows, (std::vector<int32_t>{1, 2, -1, 3, 2, -1}));
}

TEST(Semantics, TopkIdxIsLocalisedOrMinusOne) {
  // L = 2: rank 1 holds experts 2 and 3.
  EXPECT_EQ(semantics::local_expert(2, 1, 2), 0);
  EXPECT_EQ(semantics::local_expert(3, 1, 2), 1);
  EXPECT_EQ(semantics::local_expert(4, 1, 2), -1);
  EXPECT_EQ(semantics::local_expert(1, 1, 2), -1);
  EXPECT_EQ(semantics::local_expert(-1, 1, 2), -1);
  EXPECT_EQ(semantics::local_expert(-1, 0, 2), -1);
  EXPECT_EQ(semantics::local_weight(1, 0.5f), 0.5f);
  EXPECT_EQ(semantics::local_weight(-1, 0.5f), 0.0f);
  EXPECT_EQ(semantics::aligned_count(5, 4), 8);
  EXPECT_EQ(semantics::aligned_count(0, 4), 0);
  EXPECT_EQ(semantics::aligned_count(8, 4), 8);
}

// Rows of three receiving ranks: 2^24, 1, -2^24. In float32, 2^24 + 1 rounds back to 2^24, so the
// order of the additions decides the result.
const uint16_t kRows[3] = {kBf16TwoTo24, kBf16One, kBf16MinusTwo24};
const uint16_t* row_of(int r) { return &kRows[r]; }

TEST(Semantics, OneNodeAddsTheRanksAscendingThenTheBiases) {
  // ((0 + 2^24) + 1) + -2^24 = 0, then + 1 (bias_0) = 1. Biases first would give 0.
  std::vector<float> acc(1);
  uint16_t out = 0xFFFF;
  semantics::one_level_combine(acc, 3, row_of, &kBf16One, nullptr, &out);
  EXPECT_EQ(out, kBf16One);
  semantics::one_level_combine(acc, 3, row_of, nullptr, nullptr, &out);
  EXPECT_EQ(out, 0);
}

TEST(Semantics, AcrossNodesTheBiasesComeFirstThenThePartialsAscending) {
  // N = 3 nodes of G = 1: partials are the rows; (((1 + 0) + 2^24) + 1) + -2^24 = 0 (SPEC §3.6).
  std::vector<float> acc(1), node_acc(1);
  uint16_t partial = 0, out = 0xFFFF;
  semantics::two_level_combine(acc, node_acc, &partial, 3, 1, row_of, &kBf16One, nullptr, &out);
  EXPECT_EQ(out, 0);
  // A node that received nothing adds nothing: only rank 1's row, 1 + 1 = 2.
  auto only_rank_1 = [](int r) { return r == 1 ? &kRows[1] : nullptr; };
  semantics::two_level_combine(acc, node_acc, &partial, 3, 1, only_rank_1, &kBf16One, nullptr, &out);
  EXPECT_EQ(out, 0x4000);  // 2.0
}

TEST(Semantics, LayoutRangePacksBeginAndCount) {
  const int64_t packed = semantics::pack_layout_range(7, 3);
  EXPECT_EQ(packed, (int64_t(7) << 32) | 3);
  EXPECT_EQ(semantics::layout_range_begin(packed), 7);
  EXPECT_EQ(semantics::layout_range_count(packed), 3);
}

TEST(Semantics, Fp8BlockScaleIsTheAmaxOfTheBlock) {
  std::vector<uint16_t> block(128, 0x3F00);  // 0.5
  block[37] = 0xC0A0;                        // -5: the amax
  for (bool round_scale : {false, true})
    EXPECT_EQ(semantics::fp8_block_scale(block.data(), 128, round_scale), testing::ref::fp8_scale(5.0f, round_scale));
  const std::vector<uint16_t> zeros(128, 0);
  EXPECT_EQ(semantics::fp8_block_scale(zeros.data(), 128, false), testing::ref::fp8_scale(0.0f, false));
}

}  // namespace
}  // namespace epcomm
