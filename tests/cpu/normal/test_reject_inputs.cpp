// Buffer::reject_inputs in high-throughput mode (SPEC §5, issue 11): a front end that checks some
// arguments itself (the Python package) rejects a call on one rank only, while its peers make the
// call; every peer raises "rank r rejected its inputs" with the rejecting rank's error and code at
// that call, the rejecting rank is not left out of step, and the next call is exact.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <string>

#include "support/failsafe_support.hpp"
#include "support/multirank.hpp"
#include "support/normal_checks.hpp"

namespace epcomm::testing {
namespace {

using namespace std::chrono_literals;

NormalCase small_case(int num_ranks, uint64_t seed) {
  NormalCase c;
  c.num_ranks = num_ranks;
  c.num_tokens.clear();
  for (int r = 0; r < num_ranks; ++r) c.num_tokens.push_back(8 + 3 * r);
  c.hidden = 128;
  c.num_topk = 2;
  c.num_experts = 2 * num_ranks;
  c.empty_fraction = 0.1;
  c.seed = seed;
  return c;
}

// `bad_rank` rejects `kind` with Error(code, message) while every other rank runs `call`. The peers
// raise `code` naming the rank and the message, quickly (a regression would wait for the timeout);
// the rejecting rank returns; the Buffer stays usable and the next round trip is exact.
void expect_everyone_raises(Buffer& buffer, int bad_rank, CollectiveKind kind, ErrorCode code,
                            const std::string& message, const std::function<void()>& call, const NormalCase& next) {
  const int rank = buffer.rank();
  const auto start = std::chrono::steady_clock::now();
  if (rank == bad_rank) {
    EXPECT_NO_THROW(buffer.reject_inputs(kind, Error(code, message)));
  } else {
    expect_failure(call, code, {"rank " + std::to_string(bad_rank) + " rejected its inputs of this call", message});
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s) << "the call waited for a timeout";
  EXPECT_EQ(buffer.failure(), "");
  round_trip(buffer, next, DispatchOptions{}, 0);
}

TEST(RejectInputs, OneRankRejectsEachNormalModeCall) {
  const NormalCase c = small_case(3, 501);
  run_ranks(3, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 10000ms));
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, buffer);
    {
      SCOPED_TRACE("fresh dispatch rejected on rank 1 (a Python tensor description)");
      expect_everyone_raises(
          buffer, 1, CollectiveKind::kDispatch, ErrorCode::kInvalidArgument,
          "dispatch: x: dtype torch.float16 is not supported", [&] { buffer.dispatch(call.dispatch); },
          small_case(3, 502));
    }
    const DispatchResult dispatched = buffer.dispatch(call.dispatch);
    {
      SCOPED_TRACE("cached dispatch rejected on rank 2");
      DispatchInputs cached;
      cached.handle = dispatched.handle.get();
      cached.x = call.dispatch.x;
      expect_everyone_raises(
          buffer, 2, CollectiveKind::kCachedDispatch, ErrorCode::kInvalidArgument,
          "dispatch: expert_alignment: expected a 32-bit int", [&] { buffer.dispatch(cached); }, small_case(3, 503));
    }
    {
      SCOPED_TRACE("combine rejected on rank 0 with kUnsupported: the peers raise the same code");
      std::vector<uint16_t> y(size_t(dispatched.handle->num_recv_tokens) * c.hidden, 0x3F80);
      CombineInputs combine;
      combine.handle = dispatched.handle.get();
      combine.x = view_of(y, DType::kBFloat16, {dispatched.handle->num_recv_tokens, c.hidden});
      expect_everyone_raises(
          buffer, 0, CollectiveKind::kCombine, ErrorCode::kUnsupported, "combine: a DeepEP fork argument",
          [&] { buffer.combine(combine); }, small_case(3, 504));
    }
    buffer.destroy();
  });
}

// Every rank rejecting the same call alike is a call like any other: all stay usable, in step.
TEST(RejectInputs, EveryRankRejectingAlikeStaysInStep) {
  const NormalCase c = small_case(2, 511);
  run_ranks(2, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 10000ms));
    for (int i = 0; i < 3; ++i)
      EXPECT_NO_THROW(buffer.reject_inputs(CollectiveKind::kDispatch,
                                           Error(ErrorCode::kInvalidArgument, "dispatch: x: not a tensor")));
    EXPECT_EQ(buffer.failure(), "");
    round_trip(buffer, small_case(2, 512), DispatchOptions{}, 1);
    buffer.destroy();
  });
}

// A rejection is an operation of the Buffer: a failed or destroyed Buffer says so instead.
TEST(RejectInputs, FailedOrDestroyedBufferRaisesInstead) {
  const NormalCase c = small_case(2, 521);
  run_ranks(2, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 500ms));
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, buffer);
    // Rank 1 never comes to this dispatch: rank 0 times out and its Buffer is failed.
    if (rank == 0) {
      expect_failure([&] { buffer.dispatch(call.dispatch); }, ErrorCode::kTimeout, {"dispatch"});
      expect_failure(
          [&] {
            buffer.reject_inputs(CollectiveKind::kCombine, Error(ErrorCode::kInvalidArgument, "combine: x: bad"));
          },
          ErrorCode::kBufferFailed, {"first cause"});
    }
    bootstrap.barrier();
    buffer.destroy();
    expect_failure(
        [&] { buffer.reject_inputs(CollectiveKind::kDispatch, Error(ErrorCode::kInvalidArgument, "dispatch: x")); },
        ErrorCode::kInvalidArgument, {"destroyed"});
  });
}

}  // namespace
}  // namespace epcomm::testing
