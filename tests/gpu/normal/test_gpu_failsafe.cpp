// The fail-safe protocol on GPUs (SPEC §5, issue 11), high-throughput mode: a late rank and a rank
// that skips a call fail the Buffer (every later call raises BufferFailed naming the first cause,
// never mixed data), a stale handle is rejected, a front rejection on one rank cannot make its next
// call pair with its peers' current one, and in every case destroy() works and the next Buffer of the
// same processes matches the CPU reference bit for bit.
#include <gtest/gtest.h>

#include <thread>

#include "normal_support.hpp"
#include "support/gpu.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::normal {
namespace {

int smallest_ranks() {
  const std::vector<int> counts = rank_counts();
  return counts.empty() ? 0 : counts.front();
}

void expect_error(const std::optional<Error>& error, std::initializer_list<ErrorCode> codes,
                  std::initializer_list<const char*> words) {
  ASSERT_TRUE(error.has_value()) << "no epcomm::Error thrown";
  bool known = false;
  for (ErrorCode code : codes) known = known || error->code() == code;
  EXPECT_TRUE(known) << "unexpected code: " << error->what();
  for (const char* word : words) EXPECT_NE(std::string(error->what()).find(word), std::string::npos) << error->what();
}

BufferOptions short_options(int R, const Case& c, int device) {
  BufferOptions options = gpu_options(R, int64_t(c.hidden) * 2, {c.config}, device);
  options.timeout = test_timeout();
  return options;
}

// After `body` failed the first Buffer: every rank destroys it, and a new one works.
template <class Body>
void then_a_new_buffer_works(int R, const Case& c, Body&& body) {
  run_ranks(R, [&](Bootstrap& group) {
    const int device = select_device(group.rank());
    Buffer cpu(group, cpu_options());
    {
      Buffer gpu(group, short_options(R, c, device));
      body(group, gpu);
      gpu.destroy();
    }
    Buffer fresh(group, short_options(R, c, device));
    run_case(c, cpu, fresh, group.rank(), R);
    fresh.destroy();
    cpu.destroy();
  });
}

TEST(GpuFailSafe, LateRankFailsTheBufferAndEveryLaterCallSaysSo) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  c.routing = Routing::kSkewed;
  then_a_new_buffer_works(R, c, [&](Bootstrap& group, Buffer& gpu) {
    RankInputs inputs(c, group.rank(), R);
    const DispatchInputs in = inputs.dispatch_inputs(true);
    gpu.dispatch(in);
    if (group.rank() == 1) std::this_thread::sleep_for(test_timeout() + std::chrono::milliseconds(1500));
    std::optional<Error> late = error_of([&] {
      gpu.dispatch(in);
      gpu.check_errors();
    });
    expect_error(late, {ErrorCode::kTimeout, ErrorCode::kPeerFailure, ErrorCode::kInvalidArgument}, {});
    for (int step = 0; step < 3; ++step) {
      expect_error(error_of([&] { gpu.dispatch(in); }), {ErrorCode::kBufferFailed}, {"dispatch", "first cause"});
      expect_error(error_of([&] { gpu.check_errors(); }), {ErrorCode::kBufferFailed}, {"first cause"});
    }
  });
}

TEST(GpuFailSafe, RankThatSkipsACallFailsItsPeers) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  then_a_new_buffer_works(R, c, [&](Bootstrap& group, Buffer& gpu) {
    RankInputs inputs(c, group.rank(), R);
    const DispatchInputs in = inputs.dispatch_inputs(true);
    gpu.dispatch(in);
    if (group.rank() != 1) {
      expect_error(error_of([&] { gpu.dispatch(in); }), {ErrorCode::kTimeout}, {"dispatch", "rank 1"});
      expect_error(error_of([&] { gpu.dispatch(in); }), {ErrorCode::kBufferFailed}, {"rank 1"});
    }
    group.barrier();
    // Rank 1 comes back: its peers never launch again, so it times out instead of pairing with them.
    if (group.rank() == 1) {
      expect_error(error_of([&] {
                     gpu.dispatch(in);
                     gpu.check_errors();
                   }),
                   {ErrorCode::kTimeout}, {"dispatch"});
      expect_error(error_of([&] { gpu.dispatch(in); }), {ErrorCode::kBufferFailed}, {"first cause"});
    }
  });
}

// A handle of a destroyed Buffer, used by every rank on a new Buffer (perhaps at the same address).
TEST(GpuFailSafe, HandleOfADestroyedBufferIsRejected) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  then_a_new_buffer_works(R, c, [&](Bootstrap& group, Buffer& gpu) {
    const int device = select_device(group.rank());
    RankInputs inputs(c, group.rank(), R);
    std::optional<Buffer> old;
    old.emplace(group, short_options(R, c, device));
    const DispatchResult stale = old->dispatch(inputs.dispatch_inputs(true));
    old->destroy();
    old.reset();
    CombineInputs combine;
    combine.x = stale.recv_x;
    combine.handle = stale.handle.get();
    combine.config = c.config;
    expect_error(error_of([&] { gpu.combine(combine); }), {ErrorCode::kInvalidArgument},
                 {"combine", "handle", "another Buffer"});
  });
}

// The CUDA backend cannot tell its peers within the call that the front rejected this rank's inputs
// (the CPU backend can). Instead the rejection changes this rank's later call signatures: its next
// call meets its peers' current one as "a different call" on every rank, never as mixed data.
TEST(GpuFailSafe, BadInputOnOneRankNeverPairsWithItsPeersCall) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  then_a_new_buffer_works(R, c, [&](Bootstrap& group, Buffer& gpu) {
    RankInputs inputs(c, group.rank(), R);
    DispatchInputs in = inputs.dispatch_inputs(true);
    gpu.dispatch(in);
    auto dispatch_and_check = [&] {
      gpu.dispatch(in);
      gpu.check_errors();
    };
    if (group.rank() == 0) {
      DispatchInputs bad = in;
      bad.expert_alignment = 0;
      expect_error(error_of([&] { gpu.dispatch(bad); }), {ErrorCode::kInvalidArgument}, {"expert_alignment"});
      expect_error(error_of(dispatch_and_check), {ErrorCode::kInvalidArgument}, {"different call"});
    } else {
      expect_error(error_of(dispatch_and_check), {ErrorCode::kInvalidArgument},
                   {"rank 0", "rejected a call that its peers made"});
    }
    // The rejection is remembered: rank 0 stays out of step with its peers until the Buffer goes.
    expect_error(error_of(dispatch_and_check), {ErrorCode::kInvalidArgument}, {"different call"});
  });
}

// The same bad input on every rank: every rank rejects it alike, and the Buffer stays usable.
TEST(GpuFailSafe, BadInputOnEveryRankLeavesTheBufferUsable) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  then_a_new_buffer_works(R, c, [&](Bootstrap& group, Buffer& gpu) {
    RankInputs inputs(c, group.rank(), R);
    DispatchInputs bad = inputs.dispatch_inputs(true);
    bad.expert_alignment = 0;
    expect_error(error_of([&] { gpu.dispatch(bad); }), {ErrorCode::kInvalidArgument}, {"expert_alignment"});
    Buffer cpu(group, cpu_options());
    run_case(c, cpu, gpu, group.rank(), R);
    cpu.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing::normal
