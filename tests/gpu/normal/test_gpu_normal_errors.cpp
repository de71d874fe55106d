// SPEC §5 on GPUs in high-throughput mode: bad inputs give clear errors and leave the buffer usable;
// a rank that does not show up makes its peers time out naming it, without hanging.
#include <gtest/gtest.h>

#include "normal_support.hpp"
#include "support/gpu.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::normal {
namespace {

int smallest_ranks() {
  const std::vector<int> counts = rank_counts();
  return counts.empty() ? 0 : counts.front();
}

void expect_error(const std::optional<Error>& error, ErrorCode code, std::initializer_list<const char*> words) {
  ASSERT_TRUE(error.has_value()) << "no epcomm::Error thrown";
  EXPECT_EQ(error->code(), code) << error->what();
  for (const char* word : words) EXPECT_NE(std::string(error->what()).find(word), std::string::npos) << error->what();
}

// A device copy of `topk_idx` (int64) with one value replaced.
struct CorruptedIndices {
  DeviceCopy memory;
  TensorView view;
  CorruptedIndices(const TensorView& topk_idx, int64_t at, int64_t value) {
    std::vector<int64_t> host = values<int64_t>(topk_idx);
    host[at] = value;
    memory = DeviceCopy(host.data(), host.size() * 8);
    view = topk_idx;
    view.data = memory.data();
  }
};

// Runs `body(group, cpu, gpu, device)` on R ranks with a CPU reference and a CUDA buffer of `c`'s size.
template <class Body>
void with_buffers(int R, const Case& c, Body&& body, std::chrono::milliseconds timeout = {}) {
  run_ranks(R, [&](Bootstrap& group) {
    const int device = select_device(group.rank());
    BufferOptions options = gpu_options(R, int64_t(c.hidden) * 2, {c.config}, device);
    options.timeout = timeout;
    Buffer cpu(group, cpu_options());
    Buffer gpu(group, options);
    body(group, cpu, gpu);
    gpu.destroy();
    cpu.destroy();
  });
}

TEST(NormalModeErrors, BadTopkIndexOnOneRankThrowsThereWhilePeersComplete) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  c.name = "after a bad index";
  with_buffers(R, c, [&](Bootstrap& group, Buffer& cpu, Buffer& gpu) {
    RankInputs inputs(c, group.rank(), R);
    DispatchInputs in = inputs.dispatch_inputs(true);
    const int E = in.num_experts;
    CorruptedIndices bad(*in.topk_idx, 5 * c.num_topk + 1, E + 3);
    if (group.rank() == 0) in.topk_idx = bad.view;
    const std::optional<Error> error = error_of([&] { gpu.dispatch(in); });
    if (group.rank() == 0) {
      expect_error(error, ErrorCode::kInvalidArgument, {"dispatch", "topk_idx", std::to_string(E + 3).c_str()});
    } else {
      EXPECT_FALSE(error.has_value()) << error->what();
    }
    run_case(c, cpu, gpu, group.rank(), R);  // the buffer is still usable everywhere
  });
}

TEST(NormalModeErrors, BadTopkIndexInLayoutIsThrownByTheNextCheck) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  c.name = "after a bad layout";
  with_buffers(R, c, [&](Bootstrap& group, Buffer& cpu, Buffer& gpu) {
    RankInputs inputs(c, group.rank(), R);
    const DispatchInputs in = inputs.dispatch_inputs(true);
    CorruptedIndices bad(*in.topk_idx, 2, -7);
    EXPECT_NO_THROW(gpu.get_dispatch_layout(bad.view, in.num_experts));  // asynchronous
    expect_error(error_of([&] { gpu.check_errors(); }), ErrorCode::kInvalidArgument,
                 {"get_dispatch_layout", "topk_idx", "-7"});
    EXPECT_NO_THROW(gpu.check_errors()) << "a data error is thrown once";
    run_case(c, cpu, gpu, group.rank(), R);
  });
}

TEST(NormalModeErrors, NumWorstTokensTooSmallIsOutOfCapacityOnEveryRank) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  c.name = "after an overflow";
  with_buffers(R, c, [&](Bootstrap& group, Buffer& cpu, Buffer& gpu) {
    Case tight = c;
    tight.num_worst_tokens = 2;
    RankInputs inputs(tight, group.rank(), R);
    PoisonAllocator poison;
    const DispatchResult out = gpu.dispatch(inputs.dispatch_inputs(true), {.allocator = &poison});
    EXPECT_EQ(out.recv_x.size(0), 2);
    expect_error(error_of([&] { gpu.check_errors(); }), ErrorCode::kOutOfCapacity, {"num_worst_tokens"});
    run_case(c, cpu, gpu, group.rank(), R);
  });
}

TEST(NormalModeErrors, ConfigNeedingMoreMemoryThanTheBufferIsOutOfCapacity) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  c.name = "after a too-large config";
  with_buffers(R, c, [&](Bootstrap& group, Buffer& cpu, Buffer& gpu) {
    RankInputs inputs(c, group.rank(), R);
    DispatchInputs in = inputs.dispatch_inputs(true);
    in.config->num_sms = 16;
    in.config->num_max_nvl_chunked_recv_tokens = 512;
    expect_error(error_of([&] { gpu.dispatch(in); }), ErrorCode::kOutOfCapacity, {"num_nvl_bytes"});
    run_case(c, cpu, gpu, group.rank(), R);
  });
}

TEST(NormalModeErrors, RanksMakingDifferentCallsAllFailAndStayUsable) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  c.name = "after a mismatch";
  c.hidden = 512;
  with_buffers(R, c, [&](Bootstrap& group, Buffer& cpu, Buffer& gpu) {
    Case other = c;
    if (group.rank() == 0) other.hidden = 256;  // a different row size on rank 0 only
    RankInputs inputs(other, group.rank(), R);
    expect_error(error_of([&] { gpu.dispatch(inputs.dispatch_inputs(true)); }), ErrorCode::kInvalidArgument,
                 {"different call"});
    run_case(c, cpu, gpu, group.rank(), R);
  });
}

TEST(NormalModeErrors, MisalignedRowsAreRejected) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  c.name = "after misaligned x";
  with_buffers(R, c, [&](Bootstrap& group, Buffer& cpu, Buffer& gpu) {
    RankInputs inputs(c, group.rank(), R);
    DispatchInputs in = inputs.dispatch_inputs(true);
    DeviceCopy shifted(nullptr, in.x.nbytes() + 16);
    in.x.data = static_cast<char*>(shifted.data()) + 8;
    expect_error(error_of([&] { gpu.dispatch(in); }), ErrorCode::kInvalidArgument, {"x", "16-byte"});
    run_case(c, cpu, gpu, group.rank(), R);
  });
}

TEST(NormalModeErrors, RankSkippingAFreshDispatchTimesOutItsPeers) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  with_buffers(
      R, c,
      [&](Bootstrap& group, Buffer&, Buffer& gpu) {
        RankInputs inputs(c, group.rank(), R);
        const DispatchInputs in = inputs.dispatch_inputs(true);
        gpu.dispatch(in);               // everybody once
        if (group.rank() == 1) return;  // then rank 1 stays away
        expect_error(error_of([&] { gpu.dispatch(in); }), ErrorCode::kTimeout, {"dispatch", "rank 1"});
        // Sticky: the Buffer is failed, every later call says so naming the first cause (SPEC §5).
        expect_error(error_of([&] { gpu.dispatch(in); }), ErrorCode::kBufferFailed, {"rank 1"});
      },
      test_timeout());
}

TEST(NormalModeErrors, RankSkippingACombineTimesOutItsPeers) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = smallest_ranks();
  if (R == 0) GTEST_SKIP();
  Case c;
  with_buffers(
      R, c,
      [&](Bootstrap& group, Buffer&, Buffer& gpu) {
        RankInputs inputs(c, group.rank(), R);
        const DispatchResult out = gpu.dispatch(inputs.dispatch_inputs(true));
        if (group.rank() == 1) return;
        CombineInputs combine;
        combine.x = out.recv_x;
        combine.handle = out.handle.get();
        combine.config = c.config;
        EXPECT_NO_THROW(gpu.combine(combine));  // asynchronous: the kernel gives up later
        expect_error(error_of([&] { gpu.check_errors(); }), ErrorCode::kTimeout, {"combine", "rank 1"});
      },
      test_timeout());
}

}  // namespace
}  // namespace epcomm::testing::normal
