#include "reference/normal_reference.hpp"

#include "core/numerics.hpp"
#include "core/semantics.hpp"

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
  return semantics::token_goes_to_rank([&](int k) { return expert_at(c, in, token, k); }, c.num_topk,
                                       c.experts_per_rank(), rank);
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
    for (int n = 0; n < N; ++n)
      layout.per_node[n] +=
          semantics::token_goes_to_node([&](int r) { return goes_to(c, in, t, r); }, n, ranks_per_node);
    for (int k = 0; k < c.num_topk; ++k)
      if (semantics::names_expert(expert_at(c, in, t, k))) layout.per_expert[expert_at(c, in, t, k)] += 1;
  }
  return layout;
}

ExpectedDispatch expected_dispatch(const NormalCase& c, const std::vector<RankInputs>& all, int receiver,
                                   int expert_alignment) {
  const int R = c.num_ranks, K = c.num_topk, L = c.experts_per_rank();
  ExpectedDispatch out;
  out.per_expert.assign(L, 0);
  out.rank_prefix_matrix = semantics::rank_prefix_matrix(
      [&](int i, int j) {
        int sent = 0;
        for (int t = 0; t < all[i].num_tokens; ++t) sent += goes_to(c, all[i], t, j);
        return sent;
      },
      R);

  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < all[s].num_tokens; ++t) {
      for (int k = 0; k < K; ++k) {  // counted from topk_idx, whatever the routing
        const int64_t local = semantics::local_expert(expert_at(c, all[s], t, k), receiver, L);
        if (local >= 0) out.per_expert[local] += 1;
      }
      if (!goes_to(c, all[s], t, receiver)) continue;
      out.rows.push_back({s, t});
      for (int k = 0; k < K; ++k) {
        const int64_t local = semantics::local_expert(expert_at(c, all[s], t, k), receiver, L);
        out.recv_topk_idx.push_back(local);
        out.recv_topk_weights.push_back(semantics::local_weight(local, all[s].topk_weights[size_t(t) * K + k]));
      }
    }
  }
  for (int& n : out.per_expert) n = semantics::aligned_count(n, expert_alignment);
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

namespace {

// The weight rank r passes back for slot k of (source's) token t: the original where r holds the expert.
float returned_weight(const NormalCase& c, const RankInputs& in, int t, int k, int r) {
  const int64_t e = expert_at(c, in, t, k);
  return (e != -1 && e / c.experts_per_rank() == r) ? in.topk_weights[size_t(t) * c.num_topk + k] : 0.0f;
}

}  // namespace

std::vector<uint16_t> expected_combined_x(const NormalCase& c, const std::vector<RankInputs>& all, int source,
                                          int num_biases) {
  const RankInputs& in = all[source];
  const int R = c.num_ranks;
  std::vector<uint16_t> out(size_t(in.num_tokens) * c.hidden), partial(c.hidden);
  std::vector<float> acc(c.hidden), node_acc(c.hidden);
  std::vector<std::vector<uint16_t>> rows(R);  // receiving rank r's row for the token; empty: not received
  std::vector<uint16_t> bias[2];
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int r = 0; r < R; ++r)
      rows[r] = goes_to(c, in, t, r) ? expert_output_row(c, r, source, t) : std::vector<uint16_t>();
    for (int b = 0; b < 2; ++b) bias[b] = b < num_biases ? bias_row(c, source, t, b) : std::vector<uint16_t>();
    auto row = [&](int r) { return rows[r].empty() ? nullptr : rows[r].data(); };
    const uint16_t* bias_0 = bias[0].empty() ? nullptr : bias[0].data();
    const uint16_t* bias_1 = bias[1].empty() ? nullptr : bias[1].data();
    uint16_t* combined = out.data() + size_t(t) * c.hidden;
    // SPEC §3.3 (one node) or §3.6's two-level order (N > 1).
    if (c.num_nodes() > 1)
      semantics::two_level_combine(acc, node_acc, partial.data(), c.num_nodes(), c.node_size(), row, bias_0, bias_1,
                                   combined);
    else
      semantics::one_level_combine(acc, R, row, bias_0, bias_1, combined);
  }
  return out;
}

std::vector<float> expected_combined_weights(const NormalCase& c, const std::vector<RankInputs>& all, int source) {
  const RankInputs& in = all[source];
  const int K = c.num_topk, G = c.node_size();
  std::vector<float> out(size_t(in.num_tokens) * K);
  for (int t = 0; t < in.num_tokens; ++t)
    for (int k = 0; k < K; ++k) {
      float sum = 0.0f;
      for (int n = 0; n < c.num_nodes(); ++n) {  // one node: the plain sum over ranks ascending
        float node_sum = 0.0f;
        for (int r = n * G; r < (n + 1) * G; ++r)
          if (goes_to(c, in, t, r)) node_sum = node_sum + returned_weight(c, in, t, k, r);
        sum = sum + node_sum;
      }
      out[size_t(t) * K + k] = sum;
    }
  return out;
}

std::vector<int64_t> tokens_crossing_to_node(const NormalCase& c, const RankInputs& in) {
  const int G = c.node_size(), own = in.rank / G;
  std::vector<int64_t> per_node(c.num_nodes(), 0);
  for (int t = 0; t < in.num_tokens; ++t)
    for (int n = 0; n < c.num_nodes(); ++n) {
      bool any = false;
      for (int r = n * G; r < (n + 1) * G; ++r) any = any || goes_to(c, in, t, r);
      per_node[n] += (any && n != own) ? 1 : 0;
    }
  return per_node;
}

std::vector<int64_t> partials_from_forwarder(const NormalCase& c, const std::vector<RankInputs>& all, int rank) {
  const int G = c.node_size(), own = rank / G;
  std::vector<int64_t> per_node(c.num_nodes(), 0);
  for (int m = 0; m < c.num_nodes(); ++m) {
    if (m == own) continue;
    const RankInputs& source = all[m * G + rank % G];
    per_node[m] = tokens_crossing_to_node(c, source)[own];
  }
  return per_node;
}

}  // namespace epcomm::testing
