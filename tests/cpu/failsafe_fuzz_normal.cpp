// High-throughput steps of the fail-safe fuzz test (failsafe_fuzz.hpp).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>

#include "failsafe_fuzz.hpp"
#include "support/failsafe_support.hpp"
#include "support/normal_checks.hpp"

namespace epcomm::testing::fuzz {
namespace {

constexpr int kMaxTokens = 20;

NormalCase draw_case(Rng& rng, int num_ranks, int bad_rank, uint64_t seed) {
  NormalCase c;
  c.num_ranks = num_ranks;
  for (int r = 0; r < num_ranks; ++r) c.num_tokens.push_back(rng.below(kMaxTokens + 1));
  if (bad_rank >= 0 && c.num_tokens[bad_rank] == 0) c.num_tokens[bad_rank] = 1;  // something to corrupt
  c.hidden = rng.below(2) ? 256 : 128;
  c.num_experts = num_ranks * (rng.below(2) ? 4 : 2);
  c.num_topk = 1 + rng.below(4);
  c.routing = rng.below(2) ? RoutingKind::kSkewed : RoutingKind::kUniform;
  c.empty_fraction = rng.below(2) ? 0.15 : 0.0;
  c.fp8 = rng.below(4) == 0;
  c.seed = seed;
  return c;
}

DispatchOptions draw_options(Rng& rng) {
  DispatchOptions o;
  o.routing = rng.below(3) == 0 ? RoutingInput::kWithLayout : RoutingInput::kTopkOnly;
  o.with_weights = rng.below(4) != 0;
  o.int32_topk = rng.below(3) == 0;
  o.expert_alignment = rng.below(3) == 0 ? 4 : 1;
  o.num_worst_tokens = rng.below(4) == 0 ? kMaxTokens * 4 : 0;
  return o;
}

// The bad call of a step: `corrupt` edits the bad rank's inputs of `call`, `arg` must be named.
struct BadCall {
  std::string arg;
  std::function<void()> call;
};

// Runs a bad call on every rank and checks what each raises (SPEC §5).
void expect_rejected(Buffer& buffer, const Step& step, const BadCall& bad, Counts& counts) {
  const int rank = buffer.rank();
  const std::optional<Error> error = error_of(bad.call);
  ++counts.cases;
  if (!error) {
    ADD_FAILURE() << "step " << step.seed << ": rank " << rank << " raised nothing (bad rank " << step.bad_rank << ")";
    return;
  }
  const std::string what = error->what();
  const bool input_error = error->code() == ErrorCode::kInvalidArgument || error->code() == ErrorCode::kOutOfCapacity;
  const std::string peer = "rank " + std::to_string(step.bad_rank) + " rejected its inputs";
  const bool named =
      what.find(bad.arg) != std::string::npos && (rank == step.bad_rank || what.find(peer) != std::string::npos);
  EXPECT_TRUE(input_error) << "step " << step.seed << ": " << what;
  EXPECT_TRUE(named) << "step " << step.seed << ": expected '" << bad.arg << "'"
                     << (rank == step.bad_rank ? "" : " and '" + peer + "'") << ": " << what;
  EXPECT_EQ(buffer.failure(), "") << "step " << step.seed;
  if (input_error && named && buffer.failure().empty()) ++counts.rejected;
}

BadCall bad_dispatch(Rng& rng, const NormalCase& c, RankCall& call, bool corrupt,
                     std::vector<std::vector<std::byte>>& keep, Buffer& buffer) {
  DispatchInputs& in = call.dispatch;
  const int T = call.inputs.num_tokens;
  // Every rank draws the same numbers, corrupting or not: the steps after must stay the same.
  const int choice = rng.below(6);
  const int64_t shift = rng.below(5);
  const uint64_t pick = rng.next();
  std::string arg;
  switch (choice) {
    case 0:
    case 1: {
      arg = "topk_idx";
      if (!corrupt) break;
      // A value outside [-1, E): past the end, or below -1. The int32 copy is what a kWithLayout /
      // int32 call reads, so edit the tensor the call really passes.
      const int64_t value = choice == 0 ? c.num_experts + shift : -2 - shift;
      const int64_t at = int64_t(pick % uint64_t(T * c.num_topk));
      if (in.topk_idx->dtype == DType::kInt32) {
        in.topk_idx->data_as<int32_t>()[at] = static_cast<int32_t>(value);
      } else {
        in.topk_idx->data_as<int64_t>()[at] = value;
      }
      break;
    }
    case 2: {
      arg = "x";
      if (!corrupt) break;
      keep.emplace_back(size_t(T) * c.hidden * 4);
      in.x = TensorView::contiguous(keep.back().data(), DType::kFloat32, {T, c.hidden}, Device::cpu());
      break;
    }
    case 3: {
      arg = "topk_weights";
      if (!corrupt) break;
      keep.emplace_back(size_t(T) * (c.num_topk + 1) * 4);
      in.topk_weights = TensorView::contiguous(keep.back().data(), DType::kFloat32, {T, c.num_topk + 1}, Device::cpu());
      break;
    }
    case 4: {
      arg = "num_tokens_per_rank";
      if (!corrupt) break;
      keep.emplace_back(size_t(c.num_ranks) * 4);
      auto* counts = reinterpret_cast<int32_t*>(keep.back().data());
      for (int r = 0; r < c.num_ranks; ++r) counts[r] = T + 1;  // more than T: never right
      in.num_tokens_per_rank = TensorView::contiguous(counts, DType::kInt32, {c.num_ranks}, Device::cpu());
      break;
    }
    default:
      arg = "expert_alignment";
      if (corrupt) in.expert_alignment = 0;
  }
  return {arg, [&buffer, &in] { buffer.dispatch(in); }};
}

void bad_step(Buffer& buffer, const Step& step, Rng& rng, const NormalCase& c, Counts& counts) {
  const int rank = buffer.rank();
  const bool corrupt = rank == step.bad_rank;
  RankCall call;
  prepare_call(call, c, draw_options(rng), buffer);
  std::vector<std::vector<std::byte>> keep;
  const int kind = rng.below(3);
  if (kind == 0) {
    expect_rejected(buffer, step, bad_dispatch(rng, c, call, corrupt, keep, buffer), counts);
    return;
  }
  const DispatchResult dispatched = buffer.dispatch(call.dispatch);
  ++counts.cases;
  const DispatchHandle& handle = *dispatched.handle;
  const int rows = handle.num_recv_tokens, T = call.inputs.num_tokens;
  std::vector<uint16_t> y(size_t(rows + 1) * c.hidden, 0x3F80);
  DispatchHandle modified = handle;
  std::vector<int32_t> prefix(size_t(c.num_ranks) * c.num_ranks);
  const int combine_choice = rng.below(3);
  const int extra_rows = 1 + rng.below(9);
  const bool cached_x = rng.below(2) == 0;
  if (kind == 1) {
    CombineInputs in;
    in.handle = &handle;
    in.x = view_of(y, DType::kBFloat16, {rows, c.hidden});
    std::string arg;
    switch (combine_choice) {
      case 0:
        arg = "x";
        if (corrupt) in.x = view_of(y, DType::kBFloat16, {rows + 1, c.hidden});
        break;
      case 1:
        arg = "bias_0";
        if (corrupt) in.bias_0 = view_of(y, DType::kBFloat16, {T + 1, c.hidden});
        break;
      default:
        arg = "handle";
        if (corrupt) {
          std::memcpy(prefix.data(), handle.rank_prefix_matrix.data, prefix.size() * 4);
          prefix[size_t(c.num_ranks - 1) * c.num_ranks + rank] = rows + extra_rows;
          modified.rank_prefix_matrix = Tensor::borrowed(view_of(prefix, DType::kInt32, {c.num_ranks, c.num_ranks}));
          in.handle = &modified;
        }
    }
    expect_rejected(buffer, step, {arg, [&] { buffer.combine(in); }}, counts);
    return;
  }
  DispatchInputs in;
  in.handle = &handle;
  in.x = call.dispatch.x;
  in.x_scales = call.dispatch.x_scales;
  std::vector<uint16_t> x(size_t(T + 1) * c.hidden, 0x3F80);
  std::string arg;
  if (cached_x) {
    arg = "x";
    if (corrupt) {
      in.x = view_of(x, DType::kBFloat16, {T + 1, c.hidden});
      in.x_scales.reset();
    }
  } else {
    arg = "handle";
    if (corrupt) in.topk_idx = call.dispatch.topk_idx;  // a cached dispatch takes its routing from the handle
  }
  expect_rejected(buffer, step, {arg, [&] { buffer.dispatch(in); }}, counts);
}

}  // namespace

int64_t nvl_bytes(int num_ranks) {
  NormalCase largest;
  largest.num_ranks = num_ranks;
  largest.hidden = 256;
  largest.num_topk = 4;
  largest.num_experts = 4 * num_ranks;
  return small_nvl_bytes(largest);
}

void normal_step(Buffer& buffer, const Step& step, Counts& counts) {
  Rng rng(step.seed);
  const NormalCase c = draw_case(rng, buffer.num_ranks(), step.bad_rank, step.seed);
  if (step.bad_rank >= 0) bad_step(buffer, step, rng, c, counts);
  // The next valid calls work and are exact: fresh dispatch, combine, cached dispatch, all checked.
  round_trip(buffer, c, draw_options(rng), rng.below(3));
  counts.cases += 3;
}

}  // namespace epcomm::testing::fuzz
