#include "cpu/normal_routing.hpp"

#include <span>

#include "core/check.hpp"
#include "core/layouts.hpp"
#include "core/semantics.hpp"

namespace epcomm::cpu {
namespace {

Routing empty_routing(int num_tokens, int num_ranks) {
  Routing routing;
  routing.num_tokens = num_tokens;
  routing.num_ranks = num_ranks;
  routing.in_rank.assign(size_t(num_tokens) * num_ranks, 0);
  routing.per_rank.assign(num_ranks, 0);
  return routing;
}

// Routing that follows a caller's is_token_in_rank [T, R] bool (any nonzero byte is true).
Routing route_by_flags(const TensorView& is_token_in_rank, int num_ranks) {
  Routing routing = empty_routing(static_cast<int>(is_token_in_rank.size(0)), num_ranks);
  const auto* flags = is_token_in_rank.data_as<const uint8_t>();
  for (int t = 0; t < routing.num_tokens; ++t)
    for (int r = 0; r < num_ranks; ++r) {
      const bool goes = flags[size_t(t) * num_ranks + r] != 0;
      routing.in_rank[size_t(t) * num_ranks + r] = goes;
      routing.per_rank[r] += goes;
    }
  return routing;
}

// Throws unless a layout tensor the caller passed holds exactly `expected`.
void check_given_counts(const std::optional<TensorView>& given, std::span<const int32_t> expected, const char* arg,
                        const char* derived_from) {
  if (!given) return;
  const auto* values = given->data_as<const int32_t>();
  for (size_t i = 0; i < expected.size(); ++i)
    require(values[i] == expected[i], "dispatch", arg, "entry ", i, " is ", values[i], " but ", derived_from, " gives ",
            expected[i], " (pass the tensors get_dispatch_layout returned for this routing)");
}

}  // namespace

int64_t topk_at(const TensorView& topk_idx, int64_t token, int slot) {
  const int64_t i = token * topk_idx.size(1) + slot;
  return topk_idx.dtype == DType::kInt32 ? int64_t(topk_idx.data_as<const int32_t>()[i])
                                         : topk_idx.data_as<const int64_t>()[i];
}

Routing route_by_topk(const TensorView& topk_idx, int num_ranks, int num_experts, const char* op) {
  const int num_tokens = static_cast<int>(topk_idx.size(0));
  const int num_topk = static_cast<int>(topk_idx.size(1));
  const int experts_per_rank = num_experts / num_ranks;
  Routing routing = empty_routing(num_tokens, num_ranks);
  routing.per_expert.assign(num_experts, 0);
  for (int t = 0; t < num_tokens; ++t) {
    uint8_t* row = &routing.in_rank[size_t(t) * num_ranks];
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = topk_at(topk_idx, t, k);
      if (expert == -1) continue;
      require(expert >= 0 && expert < num_experts, op, "topk_idx", "value ", expert, " at [", t, ", ", k,
              "] is outside [-1, ", num_experts, ")");
      routing.per_expert[expert] += 1;
      row[semantics::rank_of_expert(expert, experts_per_rank)] = 1;
    }
    for (int r = 0; r < num_ranks; ++r) routing.per_rank[r] += row[r];
  }
  return routing;
}

Routing route_for_dispatch(const DispatchArgs& args, const GroupGeometry& geometry) {
  const DispatchInputs& in = *args.inputs;
  const int R = geometry.num_ranks;
  // Values of topk_idx are checked even when is_token_in_rank decides the routing.
  Routing by_topk;
  if (in.topk_idx) by_topk = route_by_topk(*in.topk_idx, R, args.num_experts, "dispatch");

  Routing routing = in.is_token_in_rank ? route_by_flags(*in.is_token_in_rank, R) : std::move(by_topk);
  if (in.topk_idx) {
    if (in.is_token_in_rank) routing.per_expert = std::move(by_topk.per_expert);
    check_given_counts(in.num_tokens_per_expert, routing.per_expert, "num_tokens_per_expert", "topk_idx");
  } else if (in.num_tokens_per_expert) {
    const auto* given = in.num_tokens_per_expert->data_as<const int32_t>();
    routing.per_expert.assign(given, given + args.num_experts);
    // Peers check what they receive (normal_exchange.cpp); a bad count is this rank's input error.
    const int64_t max_pairs = int64_t(args.num_tokens) * kMaxTopk;
    for (size_t e = 0; e < routing.per_expert.size(); ++e)
      require(routing.per_expert[e] >= 0 && routing.per_expert[e] <= max_pairs, "dispatch", "num_tokens_per_expert",
              "entry ", e, " is ", routing.per_expert[e], ", outside [0, T * ", kMaxTopk, " = ", max_pairs, "]");
  }

  const char* routing_source = in.is_token_in_rank ? "is_token_in_rank" : "topk_idx";
  check_given_counts(in.num_tokens_per_rank, routing.per_rank, "num_tokens_per_rank", routing_source);
  check_given_counts(in.num_tokens_per_rdma_rank, tokens_per_node(routing, geometry), "num_tokens_per_rdma_rank",
                     routing_source);
  return routing;
}

std::vector<int32_t> tokens_per_node(const Routing& routing, const GroupGeometry& geometry) {
  std::vector<int32_t> per_node(geometry.num_nodes(), 0);
  for (int t = 0; t < routing.num_tokens; ++t)
    for (int n = 0; n < geometry.num_nodes(); ++n)
      per_node[n] +=
          semantics::token_goes_to_node([&](int r) { return routing.goes_to(t, r); }, n, geometry.ranks_per_node);
  return per_node;
}

}  // namespace epcomm::cpu
