// The fail-safe protocol in low-latency mode (SPEC §5, §6, issue 11): a late rank fails the Buffer;
// ranks at different call numbers all fail; a bad input on one rank only is raised by every rank and
// the next call works; clean_low_latency_buffer must agree on its sizes; stale handles are rejected;
// with enable_shrink, a masked rank's destroy() does not wait for the survivors, nor theirs for it.
#include <gtest/gtest.h>

#include <new>
#include <span>
#include <thread>

#include "support/failsafe_support.hpp"
#include "support/low_latency_micro_batch.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

using namespace std::chrono_literals;

BufferOptions short_timeout(const LowLatencyCase& c, std::chrono::milliseconds timeout = 1000ms) {
  BufferOptions options = low_latency_options(c);
  options.timeout = timeout;
  return options;
}

void round_trip(Buffer& buffer, const LowLatencyCase& c, int rank, uint64_t seed, bool hook = false) {
  LowLatencyCase fresh = c;
  fresh.seed = seed;
  MicroBatch m(fresh, RecvFormat::kFp8, rank);
  m.dispatch_send(buffer, hook);
  m.dispatch_finish();
  m.combine_send(buffer, {.hook = hook});
  m.combine_finish();
}

const LowLatencyCase kCase{3, 6, 256, 6, 3, {6, 4, 5}, Routing::kRandom, 401};

TEST(FailSafeLowLatency, LateRankFailsTheBufferAndANewBufferWorks) {
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    {
      Buffer buffer(bootstrap, short_timeout(kCase));
      round_trip(buffer, kCase, rank, 402);
      RankInputs in = make_inputs(kCase, rank);
      if (rank == 2) std::this_thread::sleep_for(1500ms);
      const std::optional<Error> late =
          error_of([&] { buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kBf16)); });
      ASSERT_TRUE(late.has_value()) << "the late call succeeded";
      if (rank != 2) EXPECT_EQ(late->code(), ErrorCode::kTimeout) << late->what();
      for (int step = 0; step < 3; ++step) {
        expect_failure([&] { buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kFp8)); },
                       ErrorCode::kBufferFailed, {"low_latency_dispatch", "first cause"});
        expect_failure([&] { buffer.clean_low_latency_buffer(kCase.max_tokens, kCase.hidden, kCase.num_experts); },
                       ErrorCode::kBufferFailed, {"clean_low_latency_buffer"});
      }
      buffer.destroy();
    }
    Buffer fresh(bootstrap, short_timeout(kCase));
    round_trip(fresh, kCase, rank, 403, /*hook=*/true);
    fresh.destroy();
  });
}

// Receive hooks run in different orders: rank 0 receives call #2 while the others receive #1. Every
// rank sees the other call number, raises kPeerFailure naming both, and the Buffer is failed.
TEST(FailSafeLowLatency, RanksAtDifferentCallNumbersAllFail) {
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    Buffer buffer(bootstrap, short_timeout(kCase));
    RankInputs in = make_inputs(kCase, rank);
    auto first = buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kBf16), {.return_recv_hook = true});
    auto second =
        buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kBf16), {.return_recv_hook = true});
    RecvHook& hook = rank == 0 ? second.hook : first.hook;
    expect_failure([&] { hook(); }, ErrorCode::kPeerFailure, {"call order", "call #1", "call #2"});
    expect_failure([&] { buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kBf16)); },
                   ErrorCode::kBufferFailed, {"call order"});
    buffer.destroy();
  });
}

// An allocator that has run out of memory: a call that uses it stops between two of its steps.
class ExhaustedAllocator final : public Allocator {
 public:
  Tensor allocate(DType, std::span<const int64_t>, Device, StreamHandle) override { throw std::bad_alloc(); }
};

// A receive hook belongs to its Buffer: once rank 0's Buffer failed (here in a local call whose
// allocator ran out of memory), the hook of a call it sent before raises kBufferFailed and never
// meets the peers. Running it anyway would let a failed rank arrive at a step again, so the peers'
// hooks would complete with it (or, after a failure in the middle of a call, pair its next call's
// data with their current step); they must hear of the failure instead.
TEST(FailSafeLowLatency, AHookOfAFailedBufferRaisesAndThePeersHearOfIt) {
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    Buffer buffer(bootstrap, short_timeout(kCase));
    RankInputs in = make_inputs(kCase, rank);
    auto sent = buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kBf16), {.return_recv_hook = true});
    if (rank == 0) {
      ExhaustedAllocator exhausted;
      std::vector<int64_t> topk_idx{0};
      const TensorView topk = TensorView::contiguous(topk_idx.data(), DType::kInt64, {1, 1}, Device::cpu());
      EXPECT_THROW(buffer.get_dispatch_layout(topk, kCase.num_experts, {.allocator = &exhausted}), std::bad_alloc);
      ASSERT_NE(buffer.failure(), "");
    }
    bootstrap.barrier();  // rank 0 failed before any hook runs
    if (rank == 0) {
      expect_failure([&] { sent.hook(); }, ErrorCode::kBufferFailed,
                     {"low_latency_dispatch", "recv hook", "first cause", "get_dispatch_layout"});
    } else {
      expect_failure([&] { sent.hook(); }, ErrorCode::kPeerFailure, {"rank 0", "Buffer failed"});
    }
    buffer.destroy();
  });
}

// Issue 11, case 2 in low-latency mode: the send half's own check (a topk_idx value) and the front's
// (T > T_max, a combine's topk_weights shape), each on one rank only.
TEST(FailSafeLowLatency, BadInputOnOneRankIsRaisedByEveryRankOfThatCall) {
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    Buffer buffer(bootstrap, short_timeout(kCase));
    auto expect_rejected = [&](int bad_rank, const std::function<void()>& call, const std::string& arg, uint64_t seed) {
      const std::string peer_words = "rank " + std::to_string(bad_rank) + " rejected its inputs";
      expect_failure(call, ErrorCode::kInvalidArgument, {rank == bad_rank ? arg : peer_words, arg});
      EXPECT_EQ(buffer.failure(), "");
      round_trip(buffer, kCase, rank, seed, /*hook=*/seed % 2 == 0);
    };
    {
      SCOPED_TRACE("a topk_idx value on rank 1 (the send half's check)");
      RankInputs in = make_inputs(kCase, rank);
      if (rank == 1) in.topk_idx[2] = kCase.num_experts + 5;
      expect_rejected(
          1, [&] { buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kFp8)); }, "topk_idx", 411);
    }
    {
      SCOPED_TRACE("T > T_max on rank 0 (the front's check)");
      LowLatencyCase bigger = kCase;
      bigger.max_tokens = kCase.max_tokens + 1;
      bigger.tokens = {7, 7, 7};
      RankInputs in = make_inputs(rank == 0 ? bigger : kCase, rank);
      LowLatencyDispatchInputs d = dispatch_inputs(kCase, in, RecvFormat::kFp8);
      expect_rejected(
          0, [&] { buffer.low_latency_dispatch(d); }, "num_max_dispatch_tokens_per_rank", 412);
    }
    {
      SCOPED_TRACE("a combine's topk_weights on rank 2 (the front's check), with receive hooks");
      MicroBatch m(kCase, RecvFormat::kBf16, rank);
      m.dispatch_send(buffer, true);
      m.dispatch_finish();
      const int64_t L = kCase.num_local_experts(), rows = kCase.rows();
      std::vector<uint16_t> x(L * rows * kCase.hidden, 0x3F80);
      std::vector<float> weights(size_t(m.mine().num_tokens + 1) * kCase.num_topk, 0.5f);
      LowLatencyCombineInputs ci;
      ci.x = TensorView::contiguous(x.data(), DType::kBFloat16, {L, rows, kCase.hidden}, Device::cpu());
      ci.topk_idx = TensorView::contiguous(m.mine().topk_idx.data(), DType::kInt64,
                                           {m.mine().num_tokens, kCase.num_topk}, Device::cpu());
      const int64_t weight_rows = rank == 2 ? m.mine().num_tokens + 1 : m.mine().num_tokens;
      ci.topk_weights =
          TensorView::contiguous(weights.data(), DType::kFloat32, {weight_rows, kCase.num_topk}, Device::cpu());
      ci.handle = &m.dispatched().handle;
      expect_rejected(
          2,
          [&] {
            LowLatencyCombineResult r = buffer.low_latency_combine(ci, {.return_recv_hook = true});
            r.hook();
          },
          "topk_weights", 413);
    }
    buffer.destroy();
  });
}

// Issue 11, case 4: clean_low_latency_buffer with a different T_max (or hidden, E) on each rank was
// accepted. Now every rank raises naming the sizes, and the Buffer stays usable.
TEST(FailSafeLowLatency, CleanWithDifferentSizesOnEachRankIsRejectedEverywhere) {
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    Buffer buffer(bootstrap, short_timeout(kCase));
    const int max_tokens = rank == 1 ? kCase.max_tokens - 2 : kCase.max_tokens;
    expect_failure([&] { buffer.clean_low_latency_buffer(max_tokens, kCase.hidden, kCase.num_experts); },
                   ErrorCode::kInvalidArgument, {"clean_low_latency_buffer", "T_max = 4", "T_max = 6"});
    round_trip(buffer, kCase, rank, 421);
    const int hidden = rank == 2 ? 128 : kCase.hidden;
    expect_failure([&] { buffer.clean_low_latency_buffer(kCase.max_tokens, hidden, kCase.num_experts); },
                   ErrorCode::kInvalidArgument, {"clean_low_latency_buffer", "hidden = 128"});
    buffer.clean_low_latency_buffer(kCase.max_tokens, kCase.hidden, kCase.num_experts);
    round_trip(buffer, kCase, rank, 422, /*hook=*/true);
    buffer.destroy();
  });
}

TEST(FailSafeLowLatency, HandleOfADestroyedBufferIsRejected) {
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    std::optional<Buffer> buffer;
    buffer.emplace(bootstrap, short_timeout(kCase));
    MicroBatch m(kCase, RecvFormat::kBf16, rank);
    m.dispatch_send(*buffer, false);
    m.dispatch_finish();
    buffer->destroy();
    buffer.reset();
    buffer.emplace(bootstrap, short_timeout(kCase));
    expect_failure([&] { m.combine_send(*buffer, {}); }, ErrorCode::kInvalidArgument,
                   {"low_latency_combine", "another Buffer"});
    expect_failure([&] { buffer->next_low_latency_combine_buffer(m.dispatched().handle); }, ErrorCode::kInvalidArgument,
                   {"another Buffer"});
    round_trip(*buffer, kCase, rank, 431);
    buffer->destroy();
  });
}

// Issue 11, case 7 (DeepEP's shrink test): the "failed" rank, masked by everyone including itself,
// destroys its Buffer while the survivors still run for longer than the timeout; its destroy() must
// not wait for them, and theirs must not wait for it.
TEST(FailSafeLowLatency, WithShrinkAMaskedRankDestroysWhileSurvivorsRun) {
  constexpr int kFailed = 2;
  run_ranks(3, [&](Bootstrap& bootstrap) {
    const int rank = bootstrap.rank();
    BufferOptions options = short_timeout(kCase);
    options.enable_shrink = true;
    Buffer buffer(bootstrap, options);
    round_trip(buffer, kCase, rank, 441);
    buffer.low_latency_update_mask_buffer(kFailed, true);
    const auto start = std::chrono::steady_clock::now();
    if (rank == kFailed) {
      EXPECT_NO_THROW(buffer.destroy());
      EXPECT_LT(std::chrono::steady_clock::now() - start, 500ms) << "destroy() waited for the survivors";
      return;
    }
    std::this_thread::sleep_for(1200ms);  // longer than the timeout
    MicroBatch m(kCase, RecvFormat::kBf16, rank, {false, false, true});
    m.dispatch_send(buffer, false);
    m.dispatch_finish();
    m.combine_send(buffer, {});
    m.combine_finish();
    const auto before_destroy = std::chrono::steady_clock::now();
    EXPECT_NO_THROW(buffer.destroy());
    EXPECT_LT(std::chrono::steady_clock::now() - before_destroy, 500ms) << "destroy() waited for the masked rank";
  });
}

}  // namespace
}  // namespace epcomm::testing
