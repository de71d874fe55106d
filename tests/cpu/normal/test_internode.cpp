// High-throughput mode across emulated nodes (SPEC §3.6) on the CPU backend: N x G in {2x1, 2x2, 4x1,
// 2x4, 4x2}, bit for bit against the naive two-level reference, with skewed routing and T = 0 on some
// ranks; the traffic counters equal SPEC's minimum (each token once per destination node other than
// its own, one partial row per (token, node) back).
#include <gtest/gtest.h>

#include <algorithm>
#include <optional>

#include "core/layouts.hpp"
#include "support/failsafe_support.hpp"
#include "support/multirank.hpp"
#include "support/normal_checks.hpp"

namespace epcomm::testing {
namespace {

struct InternodeCase {
  const char* name;
  int num_nodes;       // N
  int ranks_per_node;  // G
  RoutingKind routing;
  bool fp8 = false;
  int num_worst_tokens = 0;
  RoutingInput input = RoutingInput::kWithLayout;
};

// T per rank: varied, with T = 0 on rank 1 (and on the last rank when R > 2).
NormalCase make_case(const InternodeCase& p) {
  NormalCase c;
  c.num_ranks = p.num_nodes * p.ranks_per_node;
  c.ranks_per_node = p.ranks_per_node;
  for (int r = 0; r < c.num_ranks; ++r)
    c.num_tokens.push_back(r == 1 || (r == c.num_ranks - 1 && c.num_ranks > 2) ? 0 : 24 + 37 * r % 61);
  c.hidden = 256;
  c.num_topk = 6;
  c.num_experts = 4 * c.num_ranks < 8 ? 8 : 4 * c.num_ranks;
  c.routing = p.routing;
  c.empty_fraction = 0.15;
  c.fp8 = p.fp8;
  c.random_route_flags = p.input == RoutingInput::kFlagsAndTopk;
  c.seed = 7000 + 100 * p.num_nodes + 10 * p.ranks_per_node + (p.fp8 ? 1 : 0);
  return c;
}

// Bytes one token puts on the network in a dispatch: its token index (int32) and its record
// (x, top-k indices and weights, scales, routing flags [R], padded to 16 bytes; normal_dispatch.hpp).
int64_t dispatch_bytes_per_token(const NormalCase& c, bool with_topk) {
  const int64_t x_bytes = int64_t(c.hidden) * (c.fp8 ? 1 : 2);
  const int64_t topk_bytes = with_topk ? int64_t(c.num_topk) * (8 + 4) : 0;
  const int64_t scale_bytes = c.fp8 ? int64_t(c.num_scales()) * 4 : 0;
  return 4 + align_up(x_bytes + topk_bytes + scale_bytes + c.num_ranks, 16);
}

std::vector<int64_t> times(std::vector<int64_t> counts, int64_t bytes) {
  for (int64_t& n : counts) n *= bytes;
  return counts;
}

class Internode : public ::testing::TestWithParam<InternodeCase> {};

TEST_P(Internode, RoundTripMatchesTwoLevelReferenceAtMinimumTraffic) {
  const InternodeCase& p = GetParam();
  const NormalCase c = make_case(p);
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    BufferOptions options = cpu_buffer_options(small_nvl_bytes(c));
    options.ranks_per_node = p.ranks_per_node;
    Buffer buffer(bootstrap, options);
    const int rank = buffer.rank();
    const std::vector<RankInputs> all = make_all_inputs(c);
    DispatchOptions o;
    o.routing = p.input;
    o.num_worst_tokens = p.num_worst_tokens;
    RankCall call;
    prepare_call(call, c, o, buffer);
    if (call.layout) {
      ASSERT_TRUE(call.layout->num_tokens_per_rdma_rank.has_value());
      const ExpectedLayout layout = expected_layout(c, all[rank], p.ranks_per_node);
      const Tensor& per_node = *call.layout->num_tokens_per_rdma_rank;
      EXPECT_EQ(
          std::vector<int32_t>(per_node.data_as<const int32_t>(), per_node.data_as<const int32_t>() + p.num_nodes),
          layout.per_node);
    }
    PoisonAllocator poison;
    const DispatchResult dispatched = buffer.dispatch(call.dispatch, {.allocator = &poison});
    check_dispatch(c, all, rank, o, dispatched);
    const std::vector<int64_t> crossing = tokens_crossing_to_node(c, all[rank]);
    EXPECT_EQ(dispatched.network_bytes_per_node, times(crossing, dispatch_bytes_per_token(c, true)))
        << "dispatch: bytes put on the network per destination node";

    const CombineResult combined = combine_and_check(buffer, c, all, rank, dispatched, /*num_biases=*/2);
    EXPECT_EQ(combined.network_bytes_per_node,
              times(partials_from_forwarder(c, all, rank), int64_t(c.hidden) * 2 + int64_t(c.num_topk) * 4))
        << "combine: bytes of per-node partials put on the network per destination node";

    cached_dispatch_and_check(buffer, c, all, rank, *dispatched.handle);
    DispatchInputs cached;
    cached.x = call.dispatch.x;
    cached.x_scales = call.dispatch.x_scales;
    cached.handle = dispatched.handle.get();
    const DispatchResult again = buffer.dispatch(cached, {.allocator = &poison});
    EXPECT_EQ(again.network_bytes_per_node, times(crossing, dispatch_bytes_per_token(c, false)))
        << "cached dispatch: bytes put on the network per destination node";
    buffer.destroy();
  });
}

INSTANTIATE_TEST_SUITE_P(Cpu, Internode,
                         ::testing::Values(InternodeCase{"n2_g1", 2, 1, RoutingKind::kUniform},
                                           InternodeCase{"n2_g2_skewed", 2, 2, RoutingKind::kSkewed},
                                           InternodeCase{"n4_g1_fp8", 4, 1, RoutingKind::kUniform, true},
                                           InternodeCase{"n2_g4_skewed_worst", 2, 4, RoutingKind::kSkewed, false, 400},
                                           InternodeCase{"n4_g2", 4, 2, RoutingKind::kUniform},
                                           InternodeCase{"n4_g2_skewed_fp8", 4, 2, RoutingKind::kSkewed, true},
                                           InternodeCase{"n2_g2_flags", 2, 2, RoutingKind::kUniform, false, 0,
                                                         RoutingInput::kFlagsAndTopk}),
                         [](const auto& info) { return std::string(info.param.name); });

// One node keeps the one-level path: no counters, no N > 1 handle fields, SPEC §3.3's order.
TEST(Internode, OneNodeKeepsTheOneLevelPath) {
  InternodeCase p{"n1_g4", 1, 4, RoutingKind::kUniform};
  const NormalCase c = make_case(p);
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c)));
    const std::vector<RankInputs> all = make_all_inputs(c);
    DispatchOptions o;
    o.routing = RoutingInput::kTopkOnly;
    RankCall call;
    prepare_call(call, c, o, buffer);
    const DispatchResult dispatched = buffer.dispatch(call.dispatch);
    check_dispatch(c, all, buffer.rank(), o, dispatched);
    EXPECT_TRUE(dispatched.network_bytes_per_node.empty());
    const CombineResult combined = combine_and_check(buffer, c, all, buffer.rank(), dispatched, 2);
    EXPECT_TRUE(combined.network_bytes_per_node.empty());
    buffer.destroy();
  });
}

// The two orders differ on this data (else the tests above could not tell them apart).
TEST(Internode, ReferenceOrdersDiffer) {
  InternodeCase p{"n2_g2", 2, 2, RoutingKind::kUniform};
  NormalCase two_level = make_case(p);
  NormalCase one_level = two_level;
  one_level.ranks_per_node = 0;
  const std::vector<RankInputs> all = make_all_inputs(two_level);
  EXPECT_NE(expected_combined_x(two_level, all, 0, 2), expected_combined_x(one_level, all, 0, 2));
}

// A buffer too small for one token's inbox slots fails naming num_nvl_bytes, on every rank.
TEST(Internode, TooSmallBufferNamesTheSizeNeeded) {
  InternodeCase p{"n2_g1", 2, 1, RoutingKind::kUniform};
  NormalCase c = make_case(p);
  c.hidden = 4096;
  c.num_tokens = {3, 3};
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    BufferOptions options = cpu_buffer_options(12 * 1024);
    options.ranks_per_node = 1;
    Buffer buffer(bootstrap, options);
    DispatchOptions o;
    RankCall call;
    prepare_call(call, c, o, buffer);
    try {
      buffer.dispatch(call.dispatch);
      ADD_FAILURE() << "dispatch with a too-small buffer did not throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("num_nvl_bytes"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("inbox"), std::string::npos) << e.what();
    }
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing

namespace epcomm::testing {
namespace {

// BufferOptions::ranks_per_node = 0: $EPCOMM_RANKS_PER_NODE, else $LOCAL_WORLD_SIZE, else one node.
TEST(Internode, NodeSizeFromTheEnvironment) {
  run_ranks(4, [](Bootstrap& bootstrap) {
    auto node_size = [&](const char* epcomm, const char* local) {
      epcomm ? setenv("EPCOMM_RANKS_PER_NODE", epcomm, 1) : unsetenv("EPCOMM_RANKS_PER_NODE");
      local ? setenv("LOCAL_WORLD_SIZE", local, 1) : unsetenv("LOCAL_WORLD_SIZE");
      Buffer buffer(bootstrap, cpu_buffer_options(1 << 16));
      const int g = buffer.ranks_per_node();
      EXPECT_EQ(buffer.options().ranks_per_node, g);
      buffer.destroy();
      return g;
    };
    EXPECT_EQ(node_size(nullptr, nullptr), 4);
    EXPECT_EQ(node_size("2", "4"), 2);
    EXPECT_EQ(node_size(nullptr, "1"), 1);
    EXPECT_EQ(node_size(nullptr, "16"), 4) << "capped at the group size";
    try {
      node_size("two", nullptr);
      ADD_FAILURE() << "a bad $EPCOMM_RANKS_PER_NODE was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("EPCOMM_RANKS_PER_NODE"), std::string::npos) << e.what();
    }
    unsetenv("EPCOMM_RANKS_PER_NODE");
  });
}

}  // namespace
}  // namespace epcomm::testing

namespace epcomm::testing {
namespace {

// The fail-safe rule of SPEC §5 on the two-level paths: a receiver never trusts its senders.
NormalCase untrusted_case(int num_nodes, int ranks_per_node, uint64_t seed) {
  NormalCase c;
  c.num_ranks = num_nodes * ranks_per_node;
  c.ranks_per_node = ranks_per_node;
  for (int r = 0; r < c.num_ranks; ++r) c.num_tokens.push_back(11 + 4 * r);
  c.hidden = 128;
  c.num_topk = 1;  // each token goes to one rank: flagging all of them for another is too many
  c.num_experts = 2 * c.num_ranks;
  c.empty_fraction = 0.0;
  c.seed = seed;
  return c;
}

// Runs `body(buffer, rank, call, dispatched)` on every rank of `c` after one fresh dispatch, then
// destroys the Buffer.
template <class Body>
void after_one_dispatch(const NormalCase& c, int ranks_per_node, Body&& body) {
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    BufferOptions options = cpu_buffer_options(small_nvl_bytes(c), std::chrono::milliseconds(2000));
    options.ranks_per_node = ranks_per_node;
    Buffer buffer(bootstrap, options);
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, buffer);
    const DispatchResult dispatched = buffer.dispatch(call.dispatch);
    body(buffer, buffer.rank(), call, dispatched);
    buffer.destroy();
  });
}

// Rank 0 flags every token of a cached dispatch for `victims` (its handle's is_token_in_rank, a
// user-visible tensor, edited): more than their rows hold. Receivers wrote next_row[source]++
// unchecked across nodes; now each victim writes nothing outside its outputs and raises
// kPeerFailure naming rank 0, whether it reads rank 0 directly (same node) or from its forwarder.
void expect_victims_refuse_extra_tokens(int num_nodes, int ranks_per_node, const std::vector<int>& victims) {
  const NormalCase c = untrusted_case(num_nodes, ranks_per_node, 361 + ranks_per_node);
  after_one_dispatch(
      c, ranks_per_node, [&](Buffer& buffer, int rank, RankCall& call, const DispatchResult& dispatched) {
        if (rank == 0) {
          auto* flags = static_cast<uint8_t*>(dispatched.handle->is_token_in_rank.data);
          for (int t = 0; t < call.inputs.num_tokens; ++t)
            for (int victim : victims) flags[t * c.num_ranks + victim] = 1;
        }
        DispatchInputs cached;
        cached.handle = dispatched.handle.get();
        cached.x = call.dispatch.x;
        const std::optional<Error> error = error_of([&] { buffer.dispatch(cached); });
        if (std::find(victims.begin(), victims.end(), rank) != victims.end()) {
          ASSERT_TRUE(error.has_value()) << "rank " << rank << " accepted more tokens than rank 0 announced";
          EXPECT_EQ(error->code(), ErrorCode::kPeerFailure) << error->what();
          EXPECT_NE(std::string(error->what()).find("rank 0 flagged more tokens"), std::string::npos) << error->what();
          expect_failure([&] { buffer.dispatch(cached); }, ErrorCode::kBufferFailed, {"first cause"});
        }
      });
}

TEST(InternodeFailSafe, ReceiverNeverWritesPastTheRowsASenderOnAnotherNodeAnnounced) {
  expect_victims_refuse_extra_tokens(2, 1, {1});
}

TEST(InternodeFailSafe, ReceiverNeverWritesPastTheRowsASenderAnnouncedOnEitherLevel) {
  expect_victims_refuse_extra_tokens(2, 2, {1, 3});  // rank 1: same node; rank 3: through rank 2's inbox
}

// Rank 0's send_row (user-visible) claims that `liar` received tokens it did not (or, `deny`, that it
// received none of those it did): rank 0 would add a partial the forwarder of the liar's node never
// put (stale inbox bytes, or zeros for its own node), or skip one and take the next token's, silently
// wrong. It raises kPeerFailure instead.
void expect_source_refuses_unexpected_partials(int num_nodes, int ranks_per_node, int liar, bool deny) {
  const NormalCase c = untrusted_case(num_nodes, ranks_per_node, 371 + ranks_per_node);
  after_one_dispatch(c, ranks_per_node,
                     [&](Buffer& buffer, int rank, RankCall& call, const DispatchResult& dispatched) {
                       if (rank == 0) {
                         auto* send_row = static_cast<int32_t*>(dispatched.handle->send_row.data);
                         int edited = 0;
                         for (int t = 0; t < call.inputs.num_tokens; ++t)
                           if ((send_row[t * c.num_ranks + liar] < 0) != deny)
                             send_row[t * c.num_ranks + liar] = deny ? -1 : 0, ++edited;
                         ASSERT_GT(edited, 0) << "the case leaves no send_row entry of rank " << liar << " to edit";
                       }
                       const int rows = dispatched.handle->num_recv_tokens;
                       std::vector<uint16_t> y(size_t(rows) * c.hidden, 0x3F80);
                       CombineInputs combine;
                       combine.handle = dispatched.handle.get();
                       combine.x = view_of(y, DType::kBFloat16, {rows, c.hidden});
                       const std::optional<Error> error = error_of([&] { buffer.combine(combine); });
                       if (rank == 0) {
                         ASSERT_TRUE(error.has_value()) << "rank 0 combined partials that were never sent";
                         EXPECT_EQ(error->code(), ErrorCode::kPeerFailure) << error->what();
                         EXPECT_NE(std::string(error->what()).find("partial"), std::string::npos) << error->what();
                         expect_failure([&] { buffer.combine(combine); }, ErrorCode::kBufferFailed, {"first cause"});
                       }
                     });
}

TEST(InternodeFailSafe, CombineNeverAddsAPartialAnotherNodeDidNotSend) {
  expect_source_refuses_unexpected_partials(2, 1, 1, false);
}

TEST(InternodeFailSafe, CombineNeverAddsAPartialItsOwnNodeDidNotMake) {
  expect_source_refuses_unexpected_partials(2, 2, 1, false);
}

TEST(InternodeFailSafe, CombineNeverSkipsAPartialAnotherNodeSent) {
  expect_source_refuses_unexpected_partials(2, 1, 1, true);
}

TEST(InternodeFailSafe, CombineNeverSkipsAPartialItsOwnNodeMade) {
  expect_source_refuses_unexpected_partials(2, 2, 1, true);
}

}  // namespace
}  // namespace epcomm::testing
