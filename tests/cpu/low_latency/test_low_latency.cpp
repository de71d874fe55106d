// Low-latency dispatch and combine of the CPU backend (SPEC §4) against a naive single-process
// reference: sizes, formats, routing corner cases, hooks, zero copy, out=, stats, call orders of
// real servers, and bit-identical repeats.
#include <gtest/gtest.h>

#include <chrono>
#include <sstream>
#include <thread>

#include "support/low_latency_micro_batch.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

struct RoundTripParam {
  LowLatencyCase c;
  RecvFormat format;
};

void PrintTo(const RoundTripParam& p, std::ostream* os) { *os << p.c.name() << " " << name_of(p.format); }

std::vector<RoundTripParam> round_trip_params() {
  // R, T_max, hidden, E, K, T per rank, routing, seed. Big hidden sizes only with few ranks (CI time).
  const std::vector<LowLatencyCase> cases = {
      {1, 17, 128, 4, 6, {17}, Routing::kRandom, 1},
      {1, 5, 512, 2, 16, {0}, Routing::kRandom, 2},
      {2, 17, 2048, 8, 8, {0, 17}, Routing::kRandom, 3},
      {2, 8, 7168, 4, 9, {8, 3}, Routing::kRandom, 4},
      {3, 9, 128, 6, 9, {1, 0, 9}, Routing::kRandom, 5},
      {4, 17, 512, 16, 16, {17, 1, 0, 5}, Routing::kRandom, 6},
      {4, 6, 128, 8, 1, {6, 6, 2, 0}, Routing::kRandom, 7},
      {8, 4, 128, 16, 8, {4, 0, 1, 4, 3, 0, 2, 4}, Routing::kRandom, 8},
      {8, 3, 512, 8, 16, {3, 3, 3, 0, 1, 2, 3, 3}, Routing::kRandom, 9},
      {4, 9, 512, 8, 6, {9, 9, 9, 9}, Routing::kAllToOneExpert, 10},
      {2, 17, 128, 2, 8, {17, 17}, Routing::kAllToOneExpert, 11},
  };
  std::vector<RoundTripParam> params;
  for (const LowLatencyCase& c : cases)
    for (RecvFormat f : {RecvFormat::kBf16, RecvFormat::kFp8, RecvFormat::kFp8RoundScale, RecvFormat::kFp8Ue8m0})
      if (f != RecvFormat::kFp8Ue8m0 || c.hidden % 512 == 0) params.push_back({c, f});
  return params;
}

class LowLatencyRoundTrip : public ::testing::TestWithParam<RoundTripParam> {};

// Dispatch + combine without hooks, then again with hooks, zero copy and out=, then the first
// round trip once more: its outputs must be bit-identical to the first time.
TEST_P(LowLatencyRoundTrip, MatchesReferenceAndRepeatsBitIdentically) {
  const LowLatencyCase c = GetParam().c;
  const RecvFormat format = GetParam().format;
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();

    MicroBatch first(c, format, rank);
    first.dispatch_send(buffer, /*hook=*/false);
    first.dispatch_finish();
    first.combine_send(buffer, {});
    first.combine_finish();

    MicroBatch second(c, format, rank);
    second.dispatch_send(buffer, /*hook=*/true);
    second.dispatch_finish();
    second.combine_send(buffer, {.hook = true, .zero_copy = true, .out = true});
    second.combine_finish();

    MicroBatch again(c, format, rank);
    again.dispatch_send(buffer, false);
    again.dispatch_finish();
    again.combine_send(buffer, {});
    again.combine_finish();
    const auto& a = first.dispatched();
    const auto& b = again.dispatched();
    EXPECT_EQ(std::memcmp(a.recv_x.data, b.recv_x.data, a.recv_x.nbytes()), 0) << "recv_x differs between runs";
    if (a.recv_x_scales) {
      EXPECT_EQ(std::memcmp(a.recv_x_scales->data, b.recv_x_scales->data, a.recv_x_scales->nbytes()), 0);
    }
    EXPECT_EQ(std::memcmp(a.handle.src_info.data, b.handle.src_info.data, a.handle.src_info.nbytes()), 0);
    EXPECT_EQ(std::memcmp(first.combined().combined_x.data, again.combined().combined_x.data,
                          first.combined().combined_x.nbytes()),
              0)
        << "combined_x differs between runs";
    buffer.destroy();
  });
}

INSTANTIATE_TEST_SUITE_P(Sizes, LowLatencyRoundTrip, ::testing::ValuesIn(round_trip_params()),
                         [](const auto& info) { return info.param.c.name() + "_" + name_of(info.param.format); });

// ---- call orders used by servers (SPEC §4.3) --------------------------------------------------

struct OrderParam {
  std::string order;  // steps of two micro-batches: d1 = dispatch of mb 1 without hook, d1s/d1h = send/hook
  bool zero_copy;
  RecvFormat format;
};

void PrintTo(const OrderParam& p, std::ostream* os) {
  *os << "'" << p.order << "'" << (p.zero_copy ? " zero_copy " : " ") << name_of(p.format);
}

class LowLatencyCallOrder : public ::testing::TestWithParam<OrderParam> {};

TEST_P(LowLatencyCallOrder, EveryMicroBatchMatchesReference) {
  const OrderParam p = GetParam();
  LowLatencyCase c1{3, 7, 512, 6, 8, {7, 2, 5}, Routing::kRandom, 21};
  LowLatencyCase c2{3, 7, 512, 6, 8, {3, 7, 0}, Routing::kRandom, 22};
  run_ranks(3, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, low_latency_options(c1));
    const int rank = bootstrap.rank();
    MicroBatch mb[2] = {MicroBatch(c1, p.format, rank), MicroBatch(c2, p.format, rank)};
    std::istringstream steps(p.order);
    for (std::string step; steps >> step;) {
      MicroBatch& m = mb[step[1] - '1'];
      const std::string half = step.substr(2);
      const bool hook = half == "s";
      if (step[0] == 'd') {
        if (half != "h") m.dispatch_send(buffer, hook);
        if (half != "s") m.dispatch_finish();
      } else {
        if (half != "h") m.combine_send(buffer, {.hook = hook, .zero_copy = p.zero_copy});
        if (half != "s") m.combine_finish();
      }
    }
    buffer.destroy();
  });
}

std::vector<OrderParam> order_params() {
  const std::vector<std::string> orders = {
      "d1 c1 d2 c2",
      "d1s d1h c1s c1h d2s d2h c2s c2h",
      "d1 d2 c1 c2",
      "d1s d2s d1h d2h c1s c2s c1h c2h",
      "d1s d2s d2h d1h c2s c1s c1h c2h",
      "d1s d2 d1h c1s c2 c1h",
  };
  std::vector<OrderParam> params;
  for (const std::string& order : orders)
    for (bool zero_copy : {false, true})
      for (RecvFormat f : {RecvFormat::kBf16, RecvFormat::kFp8Ue8m0}) params.push_back({order, zero_copy, f});
  return params;
}

INSTANTIATE_TEST_SUITE_P(Orders, LowLatencyCallOrder, ::testing::ValuesIn(order_params()), [](const auto& info) {
  std::string name = info.param.order;
  for (char& ch : name)
    if (ch == ' ') ch = '_';
  return name + (info.param.zero_copy ? "_zero_copy_" : "_") + name_of(info.param.format);
});

// ---- stats ------------------------------------------------------------------------------------

// A rank that arrives late shows up in its peers' wait-cost stats (nanoseconds).
TEST(LowLatencyStats, WaitCostCountsTheLateRank) {
  const LowLatencyCase c{3, 4, 128, 6, 4, {4, 4, 4}, Routing::kRandom, 31};
  constexpr int kLate = 1;
  constexpr auto kDelay = std::chrono::milliseconds(300);
  run_ranks(3, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    MicroBatch m(c, RecvFormat::kBf16, rank);
    const std::vector<int64_t> dispatch_before = m.dispatch_wait();
    if (rank == kLate) std::this_thread::sleep_for(kDelay);
    m.dispatch_send(buffer, false);
    m.dispatch_finish();
    const std::vector<int64_t> combine_before = m.combine_wait();
    if (rank == kLate) std::this_thread::sleep_for(kDelay);
    m.combine_send(buffer, {});
    m.combine_finish();
    if (rank != kLate) {
      EXPECT_GE(m.dispatch_wait()[kLate] - dispatch_before[kLate], 200'000'000) << "dispatch wait for rank 1 (ns)";
      EXPECT_GE(m.combine_wait()[kLate] - combine_before[kLate], 200'000'000) << "combine wait for rank 1 (ns)";
    }
    buffer.destroy();
  });
}

// ---- the zero-copy buffer ---------------------------------------------------------------------

// x may be the staging view itself (the common way to use it), and the view is the same memory
// every time for the same sizes.
TEST(LowLatencyZeroCopy, XMayBeTheStagingViewItself) {
  const LowLatencyCase c{2, 5, 256, 4, 3, {5, 4}, Routing::kRandom, 41};
  run_ranks(2, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    MicroBatch m(c, RecvFormat::kBf16, rank);
    m.dispatch_send(buffer, false);
    m.dispatch_finish();
    const TensorView staging = buffer.next_low_latency_combine_buffer(m.dispatched().handle);
    EXPECT_EQ(buffer.next_low_latency_combine_buffer(m.dispatched().handle).data, staging.data);
    EXPECT_EQ(staging.shape_string(), "[2, 10, 256]");
    fill_expert_outputs(c, rank, m.dispatched(), staging.data_as<uint16_t>());
    LowLatencyCombineInputs in;
    in.x = staging;
    in.topk_idx = TensorView::contiguous(m.mine().topk_idx.data(), DType::kInt64, {m.mine().num_tokens, c.num_topk},
                                         Device::cpu());
    in.topk_weights = TensorView::contiguous(m.mine().topk_weights.data(), DType::kFloat32,
                                             {m.mine().num_tokens, c.num_topk}, Device::cpu());
    in.handle = &m.dispatched().handle;
    in.zero_copy = true;
    const LowLatencyCombineResult result = buffer.low_latency_combine(in);
    check_combine(c, m.mine(), rank, result.combined_x, std::vector<bool>(2, false));
    buffer.destroy();
  });
}

// int32 topk_idx is accepted like int64.
TEST(LowLatencyInputs, Int32TopkIdxGivesTheSameResult) {
  const LowLatencyCase c{2, 6, 128, 4, 5, {6, 3}, Routing::kRandom, 51};
  run_ranks(2, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    std::vector<RankInputs> all = all_inputs(c);
    RankInputs& in = all[rank];
    std::vector<int32_t> idx32(in.topk_idx.begin(), in.topk_idx.end());
    LowLatencyDispatchInputs d = dispatch_inputs(c, in, RecvFormat::kBf16);
    d.topk_idx = TensorView::contiguous(idx32.data(), DType::kInt32, {in.num_tokens, c.num_topk}, Device::cpu());
    PoisonAllocator poison;
    const LowLatencyDispatchResult r = buffer.low_latency_dispatch(d, {.allocator = &poison});
    check_dispatch(c, all, rank, RecvFormat::kBf16, r, std::vector<bool>(2, false));
    std::vector<uint16_t> x(c.num_local_experts() * c.rows() * c.hidden);
    fill_expert_outputs(c, rank, r, x.data());
    LowLatencyCombineInputs ci;
    ci.x =
        TensorView::contiguous(x.data(), DType::kBFloat16, {c.num_local_experts(), c.rows(), c.hidden}, Device::cpu());
    ci.topk_idx = d.topk_idx;
    ci.topk_weights =
        TensorView::contiguous(in.topk_weights.data(), DType::kFloat32, {in.num_tokens, c.num_topk}, Device::cpu());
    ci.handle = &r.handle;
    check_combine(c, in, rank, buffer.low_latency_combine(ci).combined_x, std::vector<bool>(2, false));
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
