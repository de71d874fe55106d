// High-throughput mode of the CPU backend against the naive reference (SPEC §3): layout, dispatch,
// combine and cached dispatch, bit for bit. Big shapes run with few ranks, many ranks with small shapes.
#include <gtest/gtest.h>

#include "support/multirank.hpp"
#include "support/normal_checks.hpp"

namespace epcomm::testing {
namespace {

// ---- get_dispatch_layout -----------------------------------------------------------------------

struct LayoutCase {
  const char* name;
  NormalCase c;
  int ranks_per_node;
};

class Layout : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(Layout, MatchesNaiveCount) {
  const LayoutCase& p = GetParam();
  run_ranks(p.c.num_ranks, [&](Bootstrap& bootstrap) {
    BufferOptions options = cpu_buffer_options(1 << 16);
    options.ranks_per_node = p.ranks_per_node;
    Buffer buffer(bootstrap, options);
    RankInputs in = make_rank_inputs(p.c, buffer.rank());
    PoisonAllocator poison;
    const LayoutResult layout = buffer.get_dispatch_layout(
        view_of(in.topk_idx, DType::kInt64, {in.num_tokens, p.c.num_topk}), p.c.num_experts, {.allocator = &poison});
    const ExpectedLayout expected = expected_layout(p.c, in, p.ranks_per_node);
    auto values = [](const Tensor& t) {
      return std::vector<int32_t>(t.data_as<const int32_t>(), t.data_as<const int32_t>() + t.numel());
    };
    EXPECT_EQ(values(layout.num_tokens_per_rank), expected.per_rank);
    EXPECT_EQ(values(layout.num_tokens_per_expert), expected.per_expert);
    ASSERT_EQ(layout.num_tokens_per_rdma_rank.has_value(), p.c.num_ranks / p.ranks_per_node > 1);
    if (layout.num_tokens_per_rdma_rank) {
      EXPECT_EQ(values(*layout.num_tokens_per_rdma_rank), expected.per_node);
    }
    EXPECT_TRUE(same_flags(layout.is_token_in_rank, expected.in_rank));
    buffer.destroy();
  });
}

NormalCase layout_case(int R, std::vector<int> tokens, int K, int E, RoutingKind kind, double empty) {
  NormalCase c;
  c.num_ranks = R;
  c.num_tokens = std::move(tokens);
  c.num_topk = K;
  c.num_experts = E;
  c.routing = kind;
  c.empty_fraction = empty;
  c.seed = 1000 + R * 10 + K;
  return c;
}

INSTANTIATE_TEST_SUITE_P(
    Cpu, Layout,
    ::testing::Values(LayoutCase{"one_rank", layout_case(1, {300}, 8, 16, RoutingKind::kUniform, 0.0), 1},
                      LayoutCase{"two_nodes", layout_case(4, {200, 0, 17, 64}, 6, 32, RoutingKind::kUniform, 0.3), 2},
                      LayoutCase{"skewed_four_nodes", layout_case(4, {128, 128, 5, 1}, 4, 8, RoutingKind::kSkewed, 0.1),
                                 1},
                      LayoutCase{"k32_all_slots", layout_case(2, {64, 33}, 32, 64, RoutingKind::kUniform, 0.0), 2}),
    [](const auto& info) { return std::string(info.param.name); });

// ---- dispatch -> combine -> cached dispatch round trips -----------------------------------------

struct RoundTripCase {
  const char* name;
  NormalCase c;
  DispatchOptions options;
  int num_biases = 0;
  int64_t num_nvl_bytes = 0;  // 0 = small_nvl_bytes(c)
};

class RoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(RoundTrip, MatchesReference) {
  const RoundTripCase& p = GetParam();
  run_ranks(p.c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(p.num_nvl_bytes ? p.num_nvl_bytes : small_nvl_bytes(p.c)));
    round_trip(buffer, p.c, p.options, p.num_biases);
    buffer.destroy();
  });
}

NormalCase make_case(int R, std::vector<int> tokens, int hidden, int K, int E, uint64_t seed) {
  NormalCase c;
  c.num_ranks = R;
  c.num_tokens = std::move(tokens);
  c.hidden = hidden;
  c.num_topk = K;
  c.num_experts = E;
  c.seed = seed;
  return c;
}

NormalCase with(NormalCase c, RoutingKind kind, double empty_fraction) {
  c.routing = kind;
  c.empty_fraction = empty_fraction;
  return c;
}

NormalCase fp8(NormalCase c) {
  c.fp8 = true;
  return c;
}

NormalCase flags(NormalCase c) {
  c.random_route_flags = true;
  return c;
}

DispatchOptions options(RoutingInput routing = RoutingInput::kTopkOnly) {
  DispatchOptions o;
  o.routing = routing;
  return o;
}

DispatchOptions aligned(int alignment) {
  DispatchOptions o;
  o.expert_alignment = alignment;
  return o;
}

DispatchOptions worst(int num_worst_tokens) {
  DispatchOptions o;
  o.num_worst_tokens = num_worst_tokens;
  return o;
}

DispatchOptions column_major() {
  DispatchOptions o;
  o.column_major_scales = true;
  return o;
}

DispatchOptions int32_idx_no_weights() {
  DispatchOptions o;
  o.int32_topk = true;
  o.with_weights = false;
  return o;
}

constexpr auto kUniform = RoutingKind::kUniform;
constexpr auto kSkewed = RoutingKind::kSkewed;

INSTANTIATE_TEST_SUITE_P(
    Cpu, RoundTrip,
    ::testing::Values(
        // Every rank count the brief names, small shapes.
        RoundTripCase{"r1", make_case(1, {64}, 256, 4, 8, 1), options(), 1},
        RoundTripCase{"r2_empty_slots", with(make_case(2, {100, 37}, 512, 8, 16, 2), kUniform, 0.1), options(), 2},
        RoundTripCase{"r3_zero_tokens_on_one_rank", with(make_case(3, {50, 0, 77}, 384, 5, 12, 3), kUniform, 0.2),
                      options(), 0},
        RoundTripCase{"r4_skewed", with(make_case(4, {64, 64, 64, 64}, 256, 6, 32, 4), kSkewed, 0.0), options(), 1},
        RoundTripCase{"r8_small", with(make_case(8, {16, 0, 9, 31, 16, 1, 0, 20}, 128, 8, 64, 5), kUniform, 0.1),
                      options(), 2},
        RoundTripCase{"r8_skewed_fp8",
                      with(fp8(make_case(8, {24, 24, 3, 24, 0, 24, 24, 11}, 256, 4, 16, 6)), kSkewed, 0.05), options(),
                      0},
        // FP8 scales in both majornesses.
        RoundTripCase{"r4_fp8_row_major", fp8(make_case(4, {40, 3, 0, 29}, 512, 6, 8, 7)), options(), 1},
        RoundTripCase{"r4_fp8_column_major", with(fp8(make_case(4, {40, 3, 1, 29}, 512, 6, 8, 8)), kUniform, 0.1),
                      column_major(), 2},
        RoundTripCase{"r2_fp8_one_scale_column_major", fp8(make_case(2, {20, 9}, 128, 2, 4, 9)), column_major(), 0},
        // K and hidden at their ends.
        RoundTripCase{"r2_k1", make_case(2, {80, 60}, 256, 1, 2, 10), options(), 0},
        RoundTripCase{"r4_k32", with(make_case(4, {20, 12, 0, 7}, 128, 32, 64, 11), kUniform, 0.25), options(), 1},
        RoundTripCase{"r2_hidden_16384", make_case(2, {12, 5}, 16384, 4, 8, 12), options(), 2},
        RoundTripCase{"r2_hidden_128", make_case(2, {33, 31}, 128, 3, 6, 13), options(), 0},
        // Every slot empty: nothing moves, combine gives bias only.
        RoundTripCase{"r3_all_slots_empty", with(make_case(3, {10, 4, 0}, 256, 4, 6, 14), kUniform, 1.0), options(), 1},
        // Routing given in other forms.
        RoundTripCase{"r4_with_layout_tensors", make_case(4, {30, 30, 0, 12}, 256, 4, 16, 15),
                      options(RoutingInput::kWithLayout), 0},
        RoundTripCase{"r3_flags_only", flags(make_case(3, {25, 19, 6}, 256, 4, 6, 16)),
                      options(RoutingInput::kFlagsOnly), 1},
        RoundTripCase{"r3_flags_and_unrelated_topk", flags(make_case(3, {25, 19, 6}, 256, 4, 6, 17)),
                      options(RoutingInput::kFlagsAndTopk), 0},
        RoundTripCase{"r2_int32_idx_no_weights", make_case(2, {50, 40}, 256, 4, 8, 18), int32_idx_no_weights(), 0},
        // Per-expert counts rounded up; fixed-size outputs.
        RoundTripCase{"r4_expert_alignment_4", with(make_case(4, {32, 17, 9, 1}, 128, 4, 16, 19), kUniform, 0.1),
                      aligned(4), 0},
        RoundTripCase{"r2_expert_alignment_128", make_case(2, {32, 17}, 128, 4, 8, 20), aligned(128), 0},
        RoundTripCase{"r4_num_worst_tokens", with(make_case(4, {20, 20, 0, 9}, 256, 4, 8, 21), kUniform, 0.1),
                      worst(64), 1},
        RoundTripCase{"r2_num_worst_tokens_exact", make_case(2, {1, 0}, 128, 1, 2, 22), worst(1), 0},
        // A buffer that holds a few tokens: many dispatch rounds, one token per combine round.
        RoundTripCase{"r4_many_rounds", with(make_case(4, {100, 37, 0, 64}, 256, 6, 16, 23), kSkewed, 0.1), options(),
                      2, 4096},
        RoundTripCase{"r3_fp8_many_rounds", fp8(make_case(3, {45, 7, 30}, 384, 3, 6, 24)), column_major(), 0, 3000},
        // DeepSeek-V3's shape (T = 4096, hidden 7168, top-8 of 256) with two ranks, in a few rounds.
        RoundTripCase{"r2_deepseek_shape", make_case(2, {4096, 4096}, 7168, 8, 256, 25), options(), 1,
                      int64_t(64) << 20}),
    [](const auto& info) { return std::string(info.param.name); });

// ---- determinism -------------------------------------------------------------------------------

TEST(NormalMode, RepeatedCallsAreBitIdentical) {
  NormalCase c = with(make_case(4, {60, 45, 1, 30}, 256, 6, 16, 31), kSkewed, 0.1);
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(4096 * 3));  // several rounds, so rounds must agree too
    RankCall call;
    prepare_call(call, c, options(), buffer);
    const int num_recv_max = 1024;
    std::vector<uint16_t> y(size_t(num_recv_max) * c.hidden);
    Rng rng(seed_for(c.seed, buffer.rank(), 5));
    for (uint16_t& v : y) v = random_bf16(rng);
    std::vector<Tensor> first;
    for (int run = 0; run < 3; ++run) {
      const DispatchResult d = buffer.dispatch(call.dispatch);
      ASSERT_LE(d.handle->num_recv_tokens, num_recv_max);
      CombineInputs in;
      in.x = view_of(y, DType::kBFloat16, {d.handle->num_recv_tokens, c.hidden});
      in.handle = d.handle.get();
      in.topk_weights = *d.recv_topk_weights;
      const CombineResult combined = buffer.combine(in);
      const std::vector<Tensor> outputs = {d.recv_x,
                                           *d.recv_topk_idx,
                                           *d.recv_topk_weights,
                                           d.handle->rank_prefix_matrix,
                                           combined.combined_x,
                                           *combined.combined_topk_weights};
      if (run == 0) first = outputs;
      for (size_t i = 0; i < outputs.size(); ++i)
        EXPECT_TRUE(same_bytes(outputs[i], first[i])) << "output " << i << " run " << run;
    }
    buffer.destroy();
  });
}

// A handle serves any number of combines and cached dispatches, interleaved with other dispatches.
TEST(NormalMode, HandleIsReusable) {
  NormalCase c = with(make_case(3, {40, 22, 31}, 256, 4, 12, 32), kUniform, 0.1);
  NormalCase other = make_case(3, {5, 9, 2}, 128, 2, 6, 33);
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c)));
    const int rank = buffer.rank();
    const std::vector<RankInputs> all = make_all_inputs(c);
    RankCall call;
    prepare_call(call, c, options(), buffer);
    const DispatchResult dispatched = buffer.dispatch(call.dispatch);
    for (int i = 0; i < 2; ++i) {
      combine_and_check(buffer, c, all, rank, dispatched, i);
      cached_dispatch_and_check(buffer, c, all, rank, *dispatched.handle);
      round_trip(buffer, other, options(), 0);  // an unrelated dispatch in between
    }
    buffer.destroy();
  });
}

// Results hold their own memory: they stay valid after the buffer is destroyed and recreated.
TEST(NormalMode, ResultsOutliveTheBuffer) {
  NormalCase c = make_case(2, {16, 8}, 128, 2, 4, 34);
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    const std::vector<RankInputs> all = make_all_inputs(c);
    DispatchResult dispatched;
    {
      Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c)));
      RankCall call;
      prepare_call(call, c, options(), buffer);
      dispatched = buffer.dispatch(call.dispatch);
      buffer.destroy();
    }
    check_dispatch(c, all, bootstrap.rank(), options(), dispatched);
    Buffer again(bootstrap, cpu_buffer_options(small_nvl_bytes(c)));
    round_trip(again, c, options(), 1);
    again.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
