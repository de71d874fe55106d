// The fail-safe protocol in high-throughput mode (SPEC §5, issue 11), each case of the issue first:
// a late rank fails the Buffer and every later call says so (never mixed data, never a crash); a bad
// input on one rank only is raised by every rank at that call and the next call works; handles of
// another, a destroyed or a larger Buffer are rejected; a receiver never trusts what a peer sends.
#include <gtest/gtest.h>

#include <cstring>
#include <optional>
#include <thread>

#include "support/failsafe_support.hpp"
#include "support/multirank.hpp"
#include "support/normal_checks.hpp"

namespace epcomm::testing {
namespace {

using namespace std::chrono_literals;

NormalCase four_rank_case(uint64_t seed, RoutingKind routing) {
  NormalCase c;
  c.num_ranks = 4;
  c.num_tokens = {20, 13, 17, 9};
  c.hidden = 256;
  c.num_topk = 3;
  c.num_experts = 8;
  c.routing = routing;
  c.empty_fraction = 0.1;
  c.seed = seed;
  return c;
}

NormalCase small_case(int num_ranks, uint64_t seed) {
  NormalCase c;
  c.num_ranks = num_ranks;
  c.num_tokens.clear();
  for (int r = 0; r < num_ranks; ++r) c.num_tokens.push_back(9 + 5 * r);
  c.hidden = 128;
  c.num_topk = 2;
  c.num_experts = 2 * num_ranks;
  c.empty_fraction = 0.1;
  c.seed = seed;
  return c;
}

// Issue 11, case 1: one of 4 ranks arrives after the timeout. Its peers raise a timeout naming it,
// it raises too (its peers failed), and from then on every call of every rank raises BufferFailed
// naming the first cause, with skewed routing that changes from call to call. destroy() works and a
// new Buffer in the same process is exact.
TEST(FailSafe, LateRankFailsTheBufferAndEveryLaterCallSaysSo) {
  const NormalCase c = four_rank_case(301, RoutingKind::kSkewed);
  run_ranks(4, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    {
      Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));
      round_trip(buffer, c, DispatchOptions{}, 0);
      RankCall call;
      prepare_call(call, c, DispatchOptions{}, buffer);
      const DispatchResult before = buffer.dispatch(call.dispatch);
      if (rank == 1) std::this_thread::sleep_for(1500ms);
      const std::optional<Error> late = error_of([&] { buffer.dispatch(call.dispatch); });
      ASSERT_TRUE(late.has_value()) << "the late call succeeded";
      if (rank == 1) {
        EXPECT_TRUE(late->code() == ErrorCode::kPeerFailure || late->code() == ErrorCode::kTimeout) << late->what();
      } else {
        EXPECT_EQ(late->code(), ErrorCode::kTimeout) << late->what();
        EXPECT_NE(std::string(late->what()).find("rank(s) 1"), std::string::npos) << late->what();
      }
      EXPECT_NE(buffer.failure(), "");
      for (int step = 0; step < 4; ++step) {
        const NormalCase later = four_rank_case(302 + step, step % 2 ? RoutingKind::kSkewed : RoutingKind::kUniform);
        RankCall next;
        prepare_call(next, later, DispatchOptions{}, buffer);
        expect_failure([&] { buffer.dispatch(next.dispatch); }, ErrorCode::kBufferFailed, {"dispatch", "first cause"});
        CombineInputs combine;
        std::vector<uint16_t> y(size_t(before.handle->num_recv_tokens) * c.hidden, 0x3F80);
        combine.x = view_of(y, DType::kBFloat16, {before.handle->num_recv_tokens, c.hidden});
        combine.handle = before.handle.get();
        expect_failure([&] { buffer.combine(combine); }, ErrorCode::kBufferFailed, {"combine", "first cause"});
        expect_failure([&] { buffer.get_dispatch_layout(*next.dispatch.topk_idx, later.num_experts); },
                       ErrorCode::kBufferFailed, {"get_dispatch_layout"});
      }
      buffer.destroy();
    }
    Buffer fresh(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));
    round_trip(fresh, four_rank_case(310, RoutingKind::kSkewed), DispatchOptions{}, 1);
    fresh.destroy();
  });
}

// Issue 11, case 2, for every normal-mode call: the bad rank raises its own error, its peers raise
// "rank r rejected its inputs" with that error, at the same call; the next call works and is exact.
TEST(FailSafe, BadInputOnOneRankIsRaisedByEveryRankOfThatCall) {
  const NormalCase c = small_case(3, 311);
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));
    auto expect_rejected = [&](int bad_rank, const std::function<void()>& call, const std::string& arg) {
      const std::vector<std::string> words = {
          rank == bad_rank ? arg : "rank " + std::to_string(bad_rank) + " rejected its inputs", arg};
      expect_failure(call, ErrorCode::kInvalidArgument, words);
      EXPECT_EQ(buffer.failure(), "");
      round_trip(buffer, small_case(3, 312 + bad_rank), DispatchOptions{}, 0);
    };
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, buffer);
    {
      SCOPED_TRACE("front check of a fresh dispatch (x dtype) on rank 2");
      std::vector<float> x32(size_t(call.inputs.num_tokens) * c.hidden, 1.0f);
      DispatchInputs in = call.dispatch;
      if (rank == 2) in.x = view_of(x32, DType::kFloat32, {call.inputs.num_tokens, c.hidden});
      expect_rejected(
          2, [&] { buffer.dispatch(in); }, "x");
    }
    {
      SCOPED_TRACE("backend check of a fresh dispatch (num_tokens_per_rank) on rank 0");
      std::vector<int32_t> wrong(3, 1000);
      DispatchInputs in = call.dispatch;
      if (rank == 0) in.num_tokens_per_rank = view_of(wrong, DType::kInt32, {3});
      expect_rejected(
          0, [&] { buffer.dispatch(in); }, "num_tokens_per_rank");
    }
    const DispatchResult dispatched = buffer.dispatch(call.dispatch);
    const int rows = dispatched.handle->num_recv_tokens;
    std::vector<uint16_t> y(size_t(rows + 1) * c.hidden, 0x3F80);
    {
      SCOPED_TRACE("front check of a combine (x rows) on rank 1");
      CombineInputs in;
      in.handle = dispatched.handle.get();
      in.x = view_of(y, DType::kBFloat16, {rank == 1 ? rows + 1 : rows, c.hidden});
      expect_rejected(
          1, [&] { buffer.combine(in); }, "x");
    }
    {
      SCOPED_TRACE("front check of a cached dispatch (T) on rank 0");
      DispatchInputs in;
      in.handle = dispatched.handle.get();
      std::vector<uint16_t> x(size_t(call.inputs.num_tokens + 1) * c.hidden, 0x3F80);
      in.x = view_of(x, DType::kBFloat16, {rank == 0 ? call.inputs.num_tokens + 1 : call.inputs.num_tokens, c.hidden});
      expect_rejected(
          0, [&] { buffer.dispatch(in); }, "x");
    }
    {
      SCOPED_TRACE("a modified handle (rank_prefix_matrix) on rank 2");
      DispatchHandle modified = *dispatched.handle;
      std::vector<int32_t> prefix(9, 0);
      std::memcpy(prefix.data(), dispatched.handle->rank_prefix_matrix.data, 9 * sizeof(int32_t));
      prefix[0 * 3 + 2] = -5;
      modified.rank_prefix_matrix = Tensor::borrowed(view_of(prefix, DType::kInt32, {3, 3}));
      CombineInputs in;
      in.handle = rank == 2 ? &modified : dispatched.handle.get();
      in.x = view_of(y, DType::kBFloat16, {rows, c.hidden});
      expect_rejected(
          2, [&] { buffer.combine(in); }, "handle");
    }
    buffer.destroy();
  });
}

// Issue 11, case 3: the owner check compared addresses, which a new Buffer often reuses.
TEST(FailSafe, HandleOfADestroyedOrAnotherBufferIsRejected) {
  const NormalCase c = small_case(2, 321);
  run_ranks(2, [&](Bootstrap& bootstrap) {
    std::optional<Buffer> buffer;
    buffer.emplace(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, *buffer);
    const DispatchResult stale = buffer->dispatch(call.dispatch);
    buffer->destroy();
    buffer.reset();
    buffer.emplace(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));  // often at the same address
    std::vector<uint16_t> y(size_t(stale.handle->num_recv_tokens) * c.hidden, 0x3F80);
    CombineInputs combine;
    combine.handle = stale.handle.get();
    combine.x = view_of(y, DType::kBFloat16, {stale.handle->num_recv_tokens, c.hidden});
    expect_failure([&] { buffer->combine(combine); }, ErrorCode::kInvalidArgument,
                   {"combine", "handle", "another Buffer"});
    DispatchInputs cached;
    cached.handle = stale.handle.get();
    cached.x = call.dispatch.x;
    expect_failure([&] { buffer->dispatch(cached); }, ErrorCode::kInvalidArgument, {"dispatch", "another Buffer"});
    round_trip(*buffer, small_case(2, 322), DispatchOptions{}, 0);

    Buffer other(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));
    const DispatchResult foreign = other.dispatch(call.dispatch);
    combine.handle = foreign.handle.get();
    expect_failure([&] { buffer->combine(combine); }, ErrorCode::kInvalidArgument, {"another Buffer"});
    round_trip(*buffer, small_case(2, 323), DispatchOptions{}, 0);
    round_trip(other, small_case(2, 324), DispatchOptions{}, 0);
    other.destroy();
    buffer->destroy();
  });
}

// Issue 11, case 3: a 4-rank handle used on a 2-rank sub-group Buffer segfaulted both ranks.
TEST(FailSafe, FourRankHandleOnATwoRankSubGroupIsRejected) {
  const NormalCase c4 = small_case(4, 331);
  const NormalCase c2 = small_case(2, 332);
  run_ranks(4, [&](Bootstrap& bootstrap) {
    Buffer big(bootstrap, cpu_buffer_options(small_nvl_bytes(c4), 1000ms));
    RankCall call4;
    prepare_call(call4, c4, DispatchOptions{}, big);
    const DispatchResult wide = big.dispatch(call4.dispatch);

    SubGroup pair(bootstrap, 2);
    Buffer small(pair, cpu_buffer_options(small_nvl_bytes(c2), 1000ms));
    std::vector<uint16_t> y(size_t(wide.handle->num_recv_tokens) * c4.hidden, 0x3F80);
    CombineInputs combine;
    combine.handle = wide.handle.get();
    combine.x = view_of(y, DType::kBFloat16, {wide.handle->num_recv_tokens, c4.hidden});
    expect_failure([&] { small.combine(combine); }, ErrorCode::kInvalidArgument, {"handle", "another Buffer"});
    // The same handle claiming to be the small Buffer's: its rank count gives it away.
    RankCall call2;
    prepare_call(call2, c2, DispatchOptions{}, small);
    const DispatchResult narrow = small.dispatch(call2.dispatch);
    DispatchHandle forged = *wide.handle;
    forged.buffer_id = narrow.handle->buffer_id;
    combine.handle = &forged;
    expect_failure([&] { small.combine(combine); }, ErrorCode::kInvalidArgument, {"handle", "4 ranks"});
    round_trip(small, small_case(2, 333), DispatchOptions{}, 0);
    small.destroy();
    round_trip(big, small_case(4, 334), DispatchOptions{}, 0);
    big.destroy();
  });
}

// Issue 11, case 1's crash: receivers wrote next_row[source]++ unchecked. Rank 0 flags every token
// of a cached dispatch for rank 1 (its handle's is_token_in_rank, a user-visible tensor, edited),
// more than rank 1's rows hold: rank 1 writes nothing outside its outputs, raises kPeerFailure
// naming rank 0, and the Buffer is failed on every rank from then on. `ranks_per_node` 1 puts the
// two ranks on two nodes (rank 1 then takes rank 0's tokens from its inbox).
void expect_receiver_stops_at_the_announced_rows(uint64_t seed, int ranks_per_node) {
  NormalCase c = small_case(2, seed);
  c.num_topk = 1;  // each token goes to one rank: flagging all of them for rank 1 is too many
  c.empty_fraction = 0.0;
  run_ranks(2, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    BufferOptions options = cpu_buffer_options((ranks_per_node == 1 ? 4 : 1) * small_nvl_bytes(c), 1000ms);
    options.ranks_per_node = ranks_per_node;
    Buffer buffer(bootstrap, options);
    ASSERT_EQ(buffer.num_ranks() / buffer.ranks_per_node(), 2 / ranks_per_node);
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, buffer);
    const DispatchResult dispatched = buffer.dispatch(call.dispatch);
    if (rank == 0) {
      auto* flags = static_cast<uint8_t*>(dispatched.handle->is_token_in_rank.data);
      for (int t = 0; t < call.inputs.num_tokens; ++t) flags[t * 2 + 1] = 1;
    }
    DispatchInputs cached;
    cached.handle = dispatched.handle.get();
    cached.x = call.dispatch.x;
    const std::optional<Error> error = error_of([&] { buffer.dispatch(cached); });
    if (rank == 1) {
      ASSERT_TRUE(error.has_value());
      EXPECT_EQ(error->code(), ErrorCode::kPeerFailure) << error->what();
      EXPECT_NE(std::string(error->what()).find("rank 0 flagged more tokens"), std::string::npos) << error->what();
    }
    // Rank 0 completed its side; its next call meets rank 1's failure at once.
    const std::optional<Error> next = error_of([&] { buffer.dispatch(call.dispatch); });
    ASSERT_TRUE(next.has_value());
    EXPECT_TRUE(next->code() == ErrorCode::kBufferFailed || next->code() == ErrorCode::kPeerFailure) << next->what();
    expect_failure([&] { buffer.dispatch(call.dispatch); }, ErrorCode::kBufferFailed, {"first cause"});
    buffer.destroy();
  });
}

TEST(FailSafe, ReceiverNeverWritesPastTheRowsASenderAnnounced) { expect_receiver_stops_at_the_announced_rows(341, 2); }

// The same across nodes (N = 2, G = 1): the receiver must stop at the rows rank 0 announced just the same.
TEST(FailSafe, ReceiverAcrossNodesNeverWritesPastTheRowsASenderAnnounced) {
  expect_receiver_stops_at_the_announced_rows(342, 1);
}

// The same for combine: rank 0's send_row (user-visible) points outside what rank 1 published.
TEST(FailSafe, CombineNeverReadsOutsideWhatAPeerPublished) {
  const NormalCase c = small_case(2, 351);
  run_ranks(2, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, buffer);
    const DispatchResult dispatched = buffer.dispatch(call.dispatch);
    if (rank == 0) {
      auto* send_row = static_cast<int32_t*>(dispatched.handle->send_row.data);
      for (int t = 0; t < call.inputs.num_tokens; ++t)
        if (send_row[t * 2 + 1] >= 0) send_row[t * 2 + 1] = 1 << 28;
    }
    const int rows = dispatched.handle->num_recv_tokens;
    std::vector<uint16_t> y(size_t(rows) * c.hidden, 0x3F80);
    CombineInputs combine;
    combine.handle = dispatched.handle.get();
    combine.x = view_of(y, DType::kBFloat16, {rows, c.hidden});
    const std::optional<Error> error = error_of([&] { buffer.combine(combine); });
    if (rank == 0) {
      ASSERT_TRUE(error.has_value());
      EXPECT_EQ(error->code(), ErrorCode::kPeerFailure) << error->what();
      EXPECT_NE(std::string(error->what()).find("rank 1 published rows"), std::string::npos) << error->what();
      expect_failure([&] { buffer.combine(combine); }, ErrorCode::kBufferFailed, {"first cause"});
    }
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
