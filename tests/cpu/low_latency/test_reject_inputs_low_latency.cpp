// Buffer::reject_inputs in low-latency mode (SPEC §5, issue 11): one rank rejects a dispatch, a
// combine or a clean that its peers make; every peer raises at that call, and the next call is exact.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <string>

#include "support/failsafe_support.hpp"
#include "support/low_latency_micro_batch.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

using namespace std::chrono_literals;

const LowLatencyCase kCase{3, 6, 256, 6, 3, {6, 4, 5}, Routing::kRandom, 601};

void round_trip(Buffer& buffer, int rank, uint64_t seed, bool hook) {
  LowLatencyCase fresh = kCase;
  fresh.seed = seed;
  MicroBatch m(fresh, RecvFormat::kFp8, rank);
  m.dispatch_send(buffer, hook);
  m.dispatch_finish();
  m.combine_send(buffer, {.hook = hook});
  m.combine_finish();
}

// As in test_reject_inputs.cpp: `bad_rank` rejects, the others run `call` and raise at once.
void expect_everyone_raises(Buffer& buffer, int bad_rank, CollectiveKind kind, const std::string& message,
                            const std::function<void()>& call, uint64_t next_seed) {
  const int rank = buffer.rank();
  const auto start = std::chrono::steady_clock::now();
  if (rank == bad_rank) {
    EXPECT_NO_THROW(buffer.reject_inputs(kind, Error(ErrorCode::kInvalidArgument, message)));
  } else {
    expect_failure(call, ErrorCode::kInvalidArgument,
                   {"rank " + std::to_string(bad_rank) + " rejected its inputs", message});
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s) << "the call waited for a timeout";
  EXPECT_EQ(buffer.failure(), "");
  round_trip(buffer, rank, next_seed, /*hook=*/next_seed % 2 == 0);
}

TEST(RejectInputsLowLatency, OneRankRejectsEachLowLatencyCall) {
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    BufferOptions options = low_latency_options(kCase);
    options.timeout = 10000ms;
    Buffer buffer(bootstrap, options);
    {
      SCOPED_TRACE("low_latency_dispatch rejected on rank 2 (a fork argument)");
      RankInputs in = make_inputs(kCase, rank);
      expect_everyone_raises(
          buffer, 2, CollectiveKind::kLowLatencyDispatch, "low_latency_dispatch: use_nvfp4=True",
          [&] { buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kFp8)); }, 602);
    }
    {
      SCOPED_TRACE("low_latency_combine rejected on rank 0 (a handle field out of int32 range)");
      MicroBatch m(kCase, RecvFormat::kBf16, rank);
      m.dispatch_send(buffer, false);
      m.dispatch_finish();
      expect_everyone_raises(
          buffer, 0, CollectiveKind::kLowLatencyCombine, "low_latency_combine: handle[3] (hidden)",
          [&] { m.combine_send(buffer, {}); }, 603);
    }
    {
      SCOPED_TRACE("clean_low_latency_buffer rejected on rank 1");
      expect_everyone_raises(
          buffer, 1, CollectiveKind::kCleanLowLatency, "clean_low_latency_buffer: hidden",
          [&] { buffer.clean_low_latency_buffer(kCase.max_tokens, kCase.hidden, kCase.num_experts); }, 604);
    }
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
