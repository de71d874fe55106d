#include "normal_reference.hpp"

#include "core/numerics.hpp"

namespace epcomm::testing {
namespace {

enum Purpose { kPurposeInputs = 1, kPurposeExpertOutput = 2, kPurposeBias = 3 };

int64_t expert_at(const NormalCase& c, const RankInputs& in, int token, int slot) {
  return in.topk_idx[size_t(token) * c.num_topk + slot];
}

}  // namespace

RankInputs make_rank_inputs(const NormalCase& c, int rank) {
  RankInputs in;
  in.rank = rank;
  in.num_tokens = c.num_tokens[rank];
  Rng rng(seed_for(c.seed, rank, kPurposeInputs));
  in.topk_idx = make_topk_idx(rng, in.num_tokens, c.num_topk, c.num_experts, c.routing, c.empty_fraction);
  in.topk_weights = make_topk_weights(rng, in.num_tokens, c.num_topk);
  if (c.fp8) {
    in.x_fp8 = make_fp8(rng, in.num_tokens, c.hidden);
    in.scales = make_tagged_scales(rng, rank, in.num_tokens, c.num_scales());
  } else {
    in.x = make_tagged_bf16(rng, rank, in.num_tokens, c.hidden);
  }
  if (c.random_route_flags) {
    in.route_flags.resize(size_t(in.num_tokens) * c.num_ranks);
    for (uint8_t& f : in.route_flags) f = rng.uniform() < 0.4;
  }
  return in;
}

std::vector<RankInputs> make_all_inputs(const NormalCase& c) {
  std::vector<RankInputs> all;
  for (int r = 0; r < c.num_ranks; ++r) all.push_back(make_rank_inputs(c, r));
  return all;
}

bool goes_to(const NormalCase& c, const RankInputs& in, int token, int rank) {
  if (!in.route_flags.empty()) return in.route_flags[size_t(token) * c.num_ranks + rank] != 0;
  for (int k = 0; k < c.num_topk; ++k) {
    const int64_t e = expert_at(c, in, token, k);
    if (e != -1 && e / c.experts_per_rank() == rank) return true;
  }
  return false;
}

ExpectedLayout expected_layout(const NormalCase& c, const RankInputs& in, int ranks_per_node) {
  const int R = c.num_ranks, N = R / ranks_per_node;
  ExpectedLayout layout;
  layout.per_rank.assign(R, 0);
  layout.per_node.assign(N, 0);
  layout.per_expert.assign(c.num_experts, 0);
  layout.in_rank.assign(size_t(in.num_tokens) * R, 0);
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int r = 0; r < R; ++r) {
      layout.in_rank[size_t(t) * R + r] = goes_to(c, in, t, r);
      layout.per_rank[r] += goes_to(c, in, t, r);
    }
    for (int n = 0; n < N; ++n) {
      bool any = false;
      for (int r = n * ranks_per_node; r < (n + 1) * ranks_per_node; ++r) any = any || goes_to(c, in, t, r);
      layout.per_node[n] += any;
    }
    for (int k = 0; k < c.num_topk; ++k)
      if (expert_at(c, in, t, k) != -1) layout.per_expert[expert_at(c, in, t, k)] += 1;
  }
  return layout;
}

ExpectedDispatch expected_dispatch(const NormalCase& c, const std::vector<RankInputs>& all, int receiver,
                                   int expert_alignment) {
  const int R = c.num_ranks, K = c.num_topk, L = c.experts_per_rank();
  ExpectedDispatch out;
  out.per_expert.assign(L, 0);
  out.rank_prefix_matrix.assign(size_t(R) * R, 0);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j)
      for (int s = 0; s <= i; ++s)
        for (int t = 0; t < all[s].num_tokens; ++t) out.rank_prefix_matrix[i * R + j] += goes_to(c, all[s], t, j);

  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < all[s].num_tokens; ++t) {
      for (int k = 0; k < K; ++k) {  // counted from topk_idx, whatever the routing
        const int64_t e = expert_at(c, all[s], t, k);
        if (e != -1 && e / L == receiver) out.per_expert[e - receiver * L] += 1;
      }
      if (!goes_to(c, all[s], t, receiver)) continue;
      out.rows.push_back({s, t});
      for (int k = 0; k < K; ++k) {
        const int64_t e = expert_at(c, all[s], t, k);
        const bool local = e != -1 && e / L == receiver;
        out.recv_topk_idx.push_back(local ? e - int64_t(receiver) * L : -1);
        out.recv_topk_weights.push_back(local ? all[s].topk_weights[size_t(t) * K + k] : 0.0f);
      }
    }
  }
  for (int& n : out.per_expert) n = (n + expert_alignment - 1) / expert_alignment * expert_alignment;
  return out;
}

std::vector<uint16_t> expert_output_row(const NormalCase& c, int receiver, int source, int token) {
  Rng rng(seed_for(c.seed ^ (uint64_t(source) << 40) ^ (uint64_t(token) << 8), receiver, kPurposeExpertOutput));
  std::vector<uint16_t> row(c.hidden);
  fill_order_sensitive(rng, row);
  return row;
}

std::vector<uint16_t> bias_row(const NormalCase& c, int rank, int token, int which) {
  Rng rng(seed_for(c.seed ^ (uint64_t(token) << 8) ^ (uint64_t(which) << 50), rank, kPurposeBias));
  std::vector<uint16_t> row(c.hidden);
  fill_order_sensitive(rng, row);
  return row;
}

std::vector<uint16_t> expected_combined_x(const NormalCase& c, const std::vector<RankInputs>& all, int source,
                                          int num_biases) {
  const RankInputs& in = all[source];
  std::vector<uint16_t> out(size_t(in.num_tokens) * c.hidden);
  std::vector<float> acc(c.hidden);
  for (int t = 0; t < in.num_tokens; ++t) {
    for (float& a : acc) a = 0.0f;
    for (int r = 0; r < c.num_ranks; ++r) {  // receiving ranks, ascending
      if (!goes_to(c, in, t, r)) continue;
      const std::vector<uint16_t> row = expert_output_row(c, r, source, t);
      for (int h = 0; h < c.hidden; ++h) acc[h] = acc[h] + numerics::bf16_to_float(row[h]);
    }
    for (int b = 0; b < num_biases; ++b) {
      const std::vector<uint16_t> bias = bias_row(c, source, t, b);
      for (int h = 0; h < c.hidden; ++h) acc[h] = acc[h] + numerics::bf16_to_float(bias[h]);
    }
    for (int h = 0; h < c.hidden; ++h) out[size_t(t) * c.hidden + h] = numerics::float_to_bf16(acc[h]);
  }
  return out;
}

std::vector<float> expected_combined_weights(const NormalCase& c, const std::vector<RankInputs>& all, int source) {
  const RankInputs& in = all[source];
  const int K = c.num_topk, L = c.experts_per_rank();
  std::vector<float> out(size_t(in.num_tokens) * K);
  for (int t = 0; t < in.num_tokens; ++t)
    for (int k = 0; k < K; ++k) {
      float sum = 0.0f;
      for (int r = 0; r < c.num_ranks; ++r) {
        if (!goes_to(c, in, t, r)) continue;
        const int64_t e = expert_at(c, in, t, k);
        sum = sum + ((e != -1 && e / L == r) ? in.topk_weights[size_t(t) * K + k] : 0.0f);
      }
      out[size_t(t) * K + k] = sum;
    }
  return out;
}

}  // namespace epcomm::testing
