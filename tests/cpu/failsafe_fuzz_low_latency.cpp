// Low-latency steps of the fail-safe fuzz test (failsafe_fuzz.hpp).
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "failsafe_fuzz.hpp"
#include "support/failsafe_support.hpp"
#include "support/low_latency_micro_batch.hpp"

namespace epcomm::testing::fuzz {
namespace {

constexpr int kMaxTokens = 8;
constexpr int kMaxHidden = 512;
constexpr int kExpertsPerRank = 4;

struct Draw {
  std::mt19937_64 rng;
  int below(int n) { return static_cast<int>(rng() % uint64_t(n)); }
};

LowLatencyCase draw_case(Draw& d, int num_ranks, int bad_rank, uint64_t seed) {
  LowLatencyCase c;
  c.num_ranks = num_ranks;
  c.max_tokens = 1 + d.below(kMaxTokens);
  c.hidden = d.below(2) ? kMaxHidden : 128;
  c.num_experts = num_ranks * (1 + d.below(kExpertsPerRank));
  c.num_topk = 1 + d.below(std::min(c.num_experts, 6));
  for (int r = 0; r < num_ranks; ++r) c.tokens.push_back(d.below(c.max_tokens + 1));
  if (bad_rank >= 0 && c.tokens[bad_rank] == 0) c.tokens[bad_rank] = 1;  // something to corrupt
  c.routing = d.below(6) == 0 ? Routing::kAllToOneExpert : Routing::kRandom;
  c.seed = seed;
  return c;
}

RecvFormat draw_format(Draw& d, const LowLatencyCase& c) {
  const RecvFormat formats[] = {RecvFormat::kBf16, RecvFormat::kFp8, RecvFormat::kFp8RoundScale, RecvFormat::kFp8Ue8m0};
  const RecvFormat f = formats[d.below(4)];
  return f == RecvFormat::kFp8Ue8m0 && c.hidden % 512 != 0 ? RecvFormat::kFp8 : f;
}

// A dispatch, the experts and a combine, with or without hooks, zero copy or out=, each checked.
void valid_round_trip(Buffer& buffer, Draw& d, const LowLatencyCase& c, Counts& counts) {
  MicroBatch m(c, draw_format(d, c), buffer.rank());
  m.dispatch_send(buffer, d.below(2) == 0);
  m.dispatch_finish();
  m.combine_send(buffer, {.hook = d.below(2) == 0, .zero_copy = d.below(3) == 0, .out = d.below(3) == 0});
  m.combine_finish();
  counts.cases += 2;
}

void expect_rejected(Buffer& buffer, const Step& step, const std::vector<std::string>& bad_rank_words,
                     const std::vector<std::string>& peer_words, const std::function<void()>& call, Counts& counts) {
  const int rank = buffer.rank();
  const std::optional<Error> error = error_of(call);
  ++counts.cases;
  if (!error) {
    ADD_FAILURE() << "step " << step.seed << ": rank " << rank << " raised nothing (bad rank " << step.bad_rank << ")";
    return;
  }
  const std::string what = error->what();
  bool named = error->code() == ErrorCode::kInvalidArgument;
  for (const std::string& word : rank == step.bad_rank ? bad_rank_words : peer_words)
    named = named && what.find(word) != std::string::npos;
  EXPECT_TRUE(named) << "step " << step.seed << " (bad rank " << step.bad_rank << "): " << to_string(error->code())
                     << ": " << what;
  EXPECT_EQ(buffer.failure(), "") << "step " << step.seed;
  if (named && buffer.failure().empty()) ++counts.rejected;
}

void bad_step(Buffer& buffer, const Step& step, Draw& d, const LowLatencyCase& c, Counts& counts) {
  const int rank = buffer.rank();
  const bool corrupt = rank == step.bad_rank;
  const std::string rejected = "rank " + std::to_string(step.bad_rank) + " rejected its inputs";
  // Every rank draws the same numbers, corrupting or not: the steps after must stay the same.
  const bool hook = d.below(2) == 0;
  const int choice = d.below(6);
  const int shift = d.below(3);
  const uint64_t pick = d.rng();
  const RecvFormat format = draw_format(d, c);
  if (choice == 5) {  // clean with other sizes on one rank: every rank names both
    const int max_tokens = corrupt ? c.max_tokens + 1 : c.max_tokens;
    expect_rejected(
        buffer, step, {"clean_low_latency_buffer", "T_max"}, {"clean_low_latency_buffer", "T_max"},
        [&] { buffer.clean_low_latency_buffer(max_tokens, c.hidden, c.num_experts); }, counts);
    return;
  }
  RankInputs in = make_inputs(c, rank);
  if (choice <= 2) {
    LowLatencyDispatchInputs di = dispatch_inputs(c, in, format);
    std::string arg = "topk_idx";
    if (corrupt && choice == 0) in.topk_idx[pick % uint64_t(in.num_tokens * c.num_topk)] = c.num_experts + shift;
    if (choice == 1) {
      arg = "num_max_dispatch_tokens_per_rank";
      if (corrupt) di.num_max_dispatch_tokens_per_rank = in.num_tokens - 1;  // T > T_max
    }
    if (choice == 2) {
      arg = "use_ue8m0";
      if (corrupt) {
        di.use_fp8 = true;
        di.use_ue8m0 = true;
        di.round_scale = false;
      }
    }
    expect_rejected(
        buffer, step, {arg}, {rejected, arg},
        [&] {
          LowLatencyDispatchResult r = buffer.low_latency_dispatch(di, {.return_recv_hook = hook});
          if (r.hook) r.hook();
        },
        counts);
    return;
  }
  MicroBatch m(c, RecvFormat::kBf16, rank);
  m.dispatch_send(buffer, hook);
  m.dispatch_finish();
  ++counts.cases;
  const int64_t L = c.num_local_experts(), rows = c.rows();
  std::vector<uint16_t> x(L * rows * c.hidden, 0x3F80);
  std::vector<int64_t> topk_idx = m.mine().topk_idx;
  std::vector<float> weights(size_t(m.mine().num_tokens + 1) * c.num_topk, 0.5f);
  const int T = m.mine().num_tokens;
  std::string arg = "topk_idx";
  int64_t weight_rows = T;
  if (choice == 3) {
    arg = "topk_weights";
    if (corrupt) weight_rows = T + 1;
  } else if (corrupt) {
    topk_idx[pick % uint64_t(T * c.num_topk)] = -7;
  }
  LowLatencyCombineInputs ci;
  ci.x = TensorView::contiguous(x.data(), DType::kBFloat16, {L, rows, c.hidden}, Device::cpu());
  ci.topk_idx = TensorView::contiguous(topk_idx.data(), DType::kInt64, {T, c.num_topk}, Device::cpu());
  ci.topk_weights = TensorView::contiguous(weights.data(), DType::kFloat32, {weight_rows, c.num_topk}, Device::cpu());
  ci.handle = &m.dispatched().handle;
  expect_rejected(
      buffer, step, {arg}, {rejected, arg},
      [&] {
        LowLatencyCombineResult r = buffer.low_latency_combine(ci, {.return_recv_hook = hook});
        if (r.hook) r.hook();
      },
      counts);
}

}  // namespace

int64_t rdma_bytes(int num_ranks) {
  return low_latency_buffer_size_hint(kMaxTokens + 1, kMaxHidden, num_ranks, num_ranks * kExpertsPerRank);
}

BufferOptions buffer_options(int num_ranks) {
  BufferOptions options;
  options.backend = BackendKind::kCpu;
  options.num_nvl_bytes = nvl_bytes(num_ranks);
  options.num_rdma_bytes = rdma_bytes(num_ranks);
  options.low_latency_mode = true;
  options.timeout = std::chrono::seconds(20);
  return options;
}

void low_latency_step(Buffer& buffer, const Step& step, Counts& counts) {
  Draw d{std::mt19937_64(step.seed)};
  const LowLatencyCase c = draw_case(d, buffer.num_ranks(), step.bad_rank, step.seed);
  if (step.bad_rank >= 0) bad_step(buffer, step, d, c, counts);
  if (d.below(4) == 0) {
    buffer.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts);
    ++counts.cases;
  }
  valid_round_trip(buffer, d, c, counts);
}

}  // namespace epcomm::testing::fuzz
