// What the operations compute, as pure per-rank functions written from SPEC §3 and §4: routing, row
// order, recv_topk_idx localisation, reduction order, the low-latency row placement and weighted
// combine, the FP8 cast of one block. No communication, no memory layout: the CPU backend
// (src/cpu/) calls these between its exchanges, and bench/oracle.cpp and tests/reference/
// normal_reference.* compute their expected results with them. (tests/reference/
// low_latency_reference.hpp and reference_numerics.hpp stay independent of this file, so that
// something other than the oracle itself checks it.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <vector>

#include "core/numerics.hpp"

namespace epcomm::semantics {

// ---- routing (SPEC §3.1, §4) ------------------------------------------------------------------

// Experts are split evenly: rank r holds experts [r·L, (r+1)·L), L = E / R.
inline int rank_of_expert(int64_t expert, int experts_per_rank) { return static_cast<int>(expert / experts_per_rank); }

// A slot naming -1 routes nowhere; any other value names the expert of that slot.
inline bool names_expert(int64_t expert) { return expert != -1; }

// is_token_in_rank: the token goes to `rank` iff one of its K slots names an expert of `rank`.
// `expert_at(k)` is the token's topk_idx[k].
template <class ExpertAt>
bool token_goes_to_rank(ExpertAt&& expert_at, int num_topk, int experts_per_rank, int rank) {
  for (int k = 0; k < num_topk; ++k) {
    const int64_t e = expert_at(k);
    if (names_expert(e) && rank_of_expert(e, experts_per_rank) == rank) return true;
  }
  return false;
}

// num_tokens_per_rdma_rank: the token counts for node n iff it goes to one of the node's G ranks
// n·G .. n·G + G - 1. `goes_to(r)` is is_token_in_rank[t, r].
template <class GoesTo>
bool token_goes_to_node(GoesTo&& goes_to, int node, int ranks_per_node) {
  for (int r = node * ranks_per_node; r < (node + 1) * ranks_per_node; ++r)
    if (goes_to(r)) return true;
  return false;
}

// ---- row order (SPEC §3.2, §3.6) --------------------------------------------------------------

// rank_prefix_matrix [R, R]: [i][j] = tokens rank j receives from ranks 0..i (inclusive prefix over
// source ranks). `sent(i, j)` = tokens rank i sends to rank j.
template <class Sent>
std::vector<int32_t> rank_prefix_matrix(Sent&& sent, int num_ranks) {
  const int R = num_ranks;
  std::vector<int32_t> prefix(size_t(R) * R);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j) prefix[size_t(i) * R + j] = (i == 0 ? 0 : prefix[size_t(i - 1) * R + j]) + sent(i, j);
  return prefix;
}

// The first row of `receiver`'s recv_x that holds a token of `source`: rows are grouped by source
// rank ascending, so it is the rows received from ranks 0..source-1.
inline int32_t first_row_from(std::span<const int32_t> prefix, int num_ranks, int source, int receiver) {
  return source == 0 ? 0 : prefix[size_t(source - 1) * num_ranks + receiver];
}

// send_row [T, R] of rank `source`: the row of its token t in rank r's recv_x, or -1 when t does not
// go to r. Inside one source, rows follow the token index ascending. `goes_to(t, r)` is
// is_token_in_rank.
template <class GoesTo>
std::vector<int32_t> send_rows(GoesTo&& goes_to, std::span<const int32_t> prefix, int num_tokens, int num_ranks,
                               int source) {
  const int R = num_ranks;
  std::vector<int32_t> next(R);
  for (int r = 0; r < R; ++r) next[r] = first_row_from(prefix, R, source, r);
  std::vector<int32_t> rows(size_t(num_tokens) * R);
  for (int t = 0; t < num_tokens; ++t)
    for (int r = 0; r < R; ++r) rows[size_t(t) * R + r] = goes_to(t, r) ? next[r]++ : -1;
  return rows;
}

// recv_gbl_rank_prefix_sum [R] of `receiver` (N > 1): the inclusive prefix over source ranks of the
// rows it received, i.e. column `receiver` of rank_prefix_matrix.
inline std::vector<int32_t> recv_rank_prefix_sum(std::span<const int32_t> prefix, int num_ranks, int receiver) {
  std::vector<int32_t> per_rank(num_ranks);
  for (int s = 0; s < num_ranks; ++s) per_rank[s] = prefix[size_t(s) * num_ranks + receiver];
  return per_rank;
}

// num_recv_tokens_per_expert_list entry: the (token, slot) pairs of a local expert rounded up to a
// multiple of expert_alignment.
inline int aligned_count(int64_t pairs, int alignment) {
  return static_cast<int>((pairs + alignment - 1) / alignment * alignment);
}

// ---- recv_topk_idx localisation (SPEC §3.2) ---------------------------------------------------

// The local index e - rank·L of `expert` on `rank`, or -1 when the expert is not on that rank (or
// the slot names none).
inline int64_t local_expert(int64_t expert, int rank, int experts_per_rank) {
  const int64_t local = expert - int64_t(rank) * experts_per_rank;
  return names_expert(expert) && local >= 0 && local < experts_per_rank ? local : -1;
}

// recv_topk_weights: the weight where the index is kept, else 0.
inline float local_weight(int64_t local_index, float weight) { return local_index >= 0 ? weight : 0.0f; }

// ---- reduction order (SPEC §3.3, §3.6, §4.2) --------------------------------------------------
// Every sum is float32 in a fixed order with one rounding to bf16 at the end; the callers choose
// which rows enter in which order, these functions fix how each one enters.

// acc += row, channel by channel (the unweighted sums of combine).
inline void add_bf16_row(std::span<float> acc, const uint16_t* row) {
  for (size_t h = 0; h < acc.size(); ++h) acc[h] += numerics::bf16_to_float(row[h]);
}

// acc = fmaf(weight, row, acc), channel by channel (low-latency combine, k ascending).
inline void add_weighted_bf16_row(std::span<float> acc, float weight, const uint16_t* row) {
  for (size_t h = 0; h < acc.size(); ++h) acc[h] = std::fmaf(weight, numerics::bf16_to_float(row[h]), acc[h]);
}

// The one rounding: out = bf16(acc).
inline void round_to_bf16(std::span<const float> acc, uint16_t* out) {
  for (size_t h = 0; h < acc.size(); ++h) out[h] = numerics::float_to_bf16(acc[h]);
}

// One node (SPEC §3.3): acc = 0; acc += the rows of the receiving ranks in ascending rank order;
// then acc += bias_0, acc += bias_1 (absent biases are skipped); combined_x[t] = bf16(acc). `row(r)`
// is receiving rank r's row for the token, or nullptr when r did not receive it.
template <class RowOf>
void one_level_combine(std::span<float> acc, int num_ranks, RowOf&& row, const uint16_t* bias_0, const uint16_t* bias_1,
                       uint16_t* out) {
  std::fill(acc.begin(), acc.end(), 0.0f);
  for (int r = 0; r < num_ranks; ++r)
    if (const uint16_t* x = row(r)) add_bf16_row(acc, x);
  for (const uint16_t* bias : {bias_0, bias_1})
    if (bias) add_bf16_row(acc, bias);
  round_to_bf16(acc, out);
}

// Across nodes (SPEC §3.6), first level: the partial of one node, bf16(0 + the rows of the node's
// receiving ranks in ascending rank order).
template <class RowOf>
void node_partial(std::span<float> acc, int node, int ranks_per_node, RowOf&& row, uint16_t* partial) {
  std::fill(acc.begin(), acc.end(), 0.0f);
  for (int r = node * ranks_per_node; r < (node + 1) * ranks_per_node; ++r)
    if (const uint16_t* x = row(r)) add_bf16_row(acc, x);
  round_to_bf16(acc, partial);
}

// Second level: acc = bias_0 + bias_1 (0 where absent), then acc += p_n for the nodes that received
// the token in ascending node order (the caller adds them with add_bf16_row), then bf16(acc).
inline void start_with_biases(std::span<float> acc, const uint16_t* bias_0, const uint16_t* bias_1) {
  for (size_t h = 0; h < acc.size(); ++h) {
    const float b0 = bias_0 ? numerics::bf16_to_float(bias_0[h]) : 0.0f;
    const float b1 = bias_1 ? numerics::bf16_to_float(bias_1[h]) : 0.0f;
    acc[h] = b0 + b1;
  }
}

// The whole of SPEC §3.6's order on one process (the oracle and the test reference; the CPU backend
// computes the partials on the forwarding ranks): bf16 partial per node that received the token,
// then bias_0 + bias_1 + the partials, nodes ascending, one rounding. `acc` and `node_acc` are
// scratch of `hidden` floats, `partial` of `hidden` bf16.
template <class RowOf>
void two_level_combine(std::span<float> acc, std::span<float> node_acc, uint16_t* partial, int num_nodes,
                       int ranks_per_node, RowOf&& row, const uint16_t* bias_0, const uint16_t* bias_1, uint16_t* out) {
  start_with_biases(acc, bias_0, bias_1);
  for (int n = 0; n < num_nodes; ++n) {
    if (!token_goes_to_node([&](int r) { return row(r) != nullptr; }, n, ranks_per_node)) continue;
    node_partial(node_acc, n, ranks_per_node, row, partial);
    add_bf16_row(acc, partial);
  }
  round_to_bf16(acc, out);
}

// ---- low-latency row placement (SPEC §4.1) ----------------------------------------------------

// layout_range[l, r]: the rows of local expert l that came from rank r, as (begin << 32) | count.
inline int64_t pack_layout_range(int64_t begin, int64_t count) { return (begin << 32) | count; }
inline int64_t layout_range_begin(int64_t packed) { return packed >> 32; }
inline int64_t layout_range_count(int64_t packed) { return packed & 0xFFFFFFFF; }

// Whether the token selects `expert` in some slot: it then has one row in that expert's block, at
// the position given by source rank ascending, then token index ascending.
template <class ExpertAt>
bool token_selects_expert(ExpertAt&& expert_at, int num_topk, int64_t expert) {
  for (int k = 0; k < num_topk; ++k)
    if (expert_at(k) == expert) return true;
  return false;
}

// ---- FP8 cast (SPEC §4.1) ---------------------------------------------------------------------

// The scale of one block of 128 channels of a bf16 row: amax = max |x| (floored inside fp8_scale),
// s = amax / 448, or its next power of two with round_scale.
inline float fp8_block_scale(const uint16_t* block, int block_size, bool round_scale) {
  float amax = 0.0f;
  for (int i = 0; i < block_size; ++i) amax = std::fmax(amax, std::fabs(numerics::bf16_to_float(block[i])));
  return numerics::fp8_scale(amax, round_scale);
}

}  // namespace epcomm::semantics
