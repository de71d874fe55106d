// The mask functions of SPEC §6 (enable_shrink): a masked rank is skipped by every wait and
// contributes nothing: its tokens are not received, and combine slots naming its experts count as
// if they were -1.
#include <gtest/gtest.h>

#include <string>

#include "support/low_latency_micro_batch.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

BufferOptions shrink_options(const LowLatencyCase& c) {
  BufferOptions options = low_latency_options(c);
  options.enable_shrink = true;
  options.timeout = std::chrono::milliseconds(1000);
  return options;
}

std::vector<int32_t> mask_of(Buffer& buffer) {
  const TensorView mask = buffer.low_latency_query_mask_buffer();
  EXPECT_EQ(mask.dtype, DType::kInt32);
  EXPECT_EQ(mask.ndim, 1);
  return std::vector<int32_t>(mask.data_as<int32_t>(), mask.data_as<int32_t>() + mask.numel());
}

TEST(LowLatencyMask, UpdateQueryClean) {
  const LowLatencyCase c{3, 2, 128, 3, 2, {2, 2, 2}, Routing::kRandom, 81};
  run_ranks(3, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, shrink_options(c));
    EXPECT_EQ(mask_of(buffer), std::vector<int32_t>({0, 0, 0}));
    buffer.low_latency_update_mask_buffer(1, true);
    EXPECT_EQ(mask_of(buffer), std::vector<int32_t>({0, 1, 0}));
    buffer.low_latency_update_mask_buffer(1, false);
    buffer.low_latency_update_mask_buffer(2, true);
    EXPECT_EQ(mask_of(buffer), std::vector<int32_t>({0, 0, 1}));
    buffer.low_latency_clean_mask_buffer();
    EXPECT_EQ(mask_of(buffer), std::vector<int32_t>({0, 0, 0}));
    try {
      buffer.low_latency_update_mask_buffer(3, true);
      ADD_FAILURE() << "rank 3 of 3 accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("rank"), std::string::npos) << e.what();
    }
    buffer.destroy();
  });
}

TEST(LowLatencyMask, NeedsEnableShrink) {
  const LowLatencyCase c{2, 2, 128, 2, 2, {2, 2}, Routing::kRandom, 82};
  run_ranks(2, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, low_latency_options(c));
    try {
      buffer.low_latency_query_mask_buffer();
      ADD_FAILURE() << "query_mask without enable_shrink accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("enable_shrink"), std::string::npos) << e.what();
    }
    buffer.destroy();
  });
}

// Ranks 0, 1 and 3 mask rank 2, which stopped taking part: they do not wait for it, receive none of
// its tokens, and combine as if the slots naming its experts were -1. Hooks and zero copy too.
TEST(LowLatencyMask, MaskedRankIsSkippedAndContributesNothing) {
  const LowLatencyCase c{4, 6, 512, 8, 8, {6, 3, 6, 5}, Routing::kRandom, 83};
  constexpr int kStopped = 2;
  run_ranks(4, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, shrink_options(c));
    const int rank = bootstrap.rank();
    if (rank != kStopped) {
      buffer.low_latency_update_mask_buffer(kStopped, true);
      const std::vector<bool> masked = {false, false, true, false};
      for (bool hook : {false, true}) {
        MicroBatch m(c, RecvFormat::kFp8RoundScale, rank, masked);
        const int64_t dispatch_wait = m.dispatch_wait()[kStopped], combine_wait = m.combine_wait()[kStopped];
        m.dispatch_send(buffer, hook);
        m.dispatch_finish();
        m.combine_send(buffer, {.hook = hook, .zero_copy = hook});
        m.combine_finish();
        EXPECT_EQ(m.dispatch_wait()[kStopped], dispatch_wait) << "nobody waits for a masked rank";
        EXPECT_EQ(m.combine_wait()[kStopped], combine_wait);
      }
    }
    bootstrap.barrier();
    buffer.destroy();
  });
}

// With enable_shrink a rank that does not arrive within the timeout is masked instead of failing
// the call: the call completes without it, and the mask says so.
TEST(LowLatencyMask, TimeoutMasksTheLateRank) {
  const LowLatencyCase c{3, 5, 128, 6, 6, {5, 4, 5}, Routing::kRandom, 84};
  constexpr int kStopped = 1;
  run_ranks(3, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, shrink_options(c));
    const int rank = bootstrap.rank();
    if (rank != kStopped) {
      const std::vector<bool> masked = {false, true, false};
      MicroBatch m(c, RecvFormat::kBf16, rank, masked);
      const int64_t waited_before = m.dispatch_wait()[kStopped];
      m.dispatch_send(buffer, false);
      m.dispatch_finish();
      EXPECT_EQ(mask_of(buffer), std::vector<int32_t>({0, 1, 0}));
      EXPECT_GE(m.dispatch_wait()[kStopped] - waited_before, 900'000'000) << "the timeout counts as waiting (ns)";
      m.combine_send(buffer, {});
      m.combine_finish();
      buffer.low_latency_clean_mask_buffer();
      EXPECT_EQ(mask_of(buffer), std::vector<int32_t>({0, 0, 0}));
    }
    bootstrap.barrier();
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
