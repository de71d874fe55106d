// A naive, single-process model of high-throughput mode written from SPEC §3 and the lead's
// semantics, independent of the backends' transport: given every rank's inputs (regenerated from
// per-rank seeds), it says what each rank must receive and what combine must return. Its per-token
// rules (routing, localisation, row order, reduction order) are those of src/core/semantics.hpp,
// which the CPU backend applies too; low_latency_reference.hpp is the reference written without it.
#pragma once

#include <cstdint>
#include <vector>

#include "support/moe_data.hpp"

namespace epcomm::testing {

struct NormalCase {
  int num_ranks = 1;
  std::vector<int> num_tokens;  // [R]: T of each rank (may differ, may be 0)
  int hidden = 256;
  int num_topk = 4;     // K
  int num_experts = 8;  // E
  RoutingKind routing = RoutingKind::kUniform;
  double empty_fraction = 0.0;  // probability of a -1 slot
  bool fp8 = false;
  bool random_route_flags = false;  // RankInputs::route_flags drawn independently of topk_idx
  int ranks_per_node = 0;           // G; 0 = every rank in one node. N > 1 selects SPEC §3.6's combine order
  uint64_t seed = 1;

  int num_scales() const { return hidden / 128; }
  int node_size() const { return ranks_per_node == 0 ? num_ranks : ranks_per_node; }
  int num_nodes() const { return num_ranks / node_size(); }
  int experts_per_rank() const { return num_experts / num_ranks; }
};

// One rank's dispatch inputs. Row-major everywhere; tests present other layouts themselves.
struct RankInputs {
  int rank = 0;
  int num_tokens = 0;
  std::vector<uint16_t> x;           // bf16 [T, hidden] (tagged: see make_tagged_bf16)
  std::vector<uint8_t> x_fp8;        // e4m3 [T, hidden] (fp8 cases)
  std::vector<float> scales;         // [T, S] (fp8 cases; scales[t][0] is a tag)
  std::vector<int64_t> topk_idx;     // [T, K]
  std::vector<float> topk_weights;   // [T, K]
  std::vector<uint8_t> route_flags;  // [T, R]; when not empty it decides the routing (is_token_in_rank)
};

RankInputs make_rank_inputs(const NormalCase& c, int rank);
std::vector<RankInputs> make_all_inputs(const NormalCase& c);

// SPEC §3.2: token t of `in` goes to rank r (flags if given, else some slot names an expert of r).
bool goes_to(const NormalCase& c, const RankInputs& in, int token, int rank);

struct ExpectedLayout {
  std::vector<int32_t> per_rank;    // [R]
  std::vector<int32_t> per_node;    // [N]
  std::vector<int32_t> per_expert;  // [E]
  std::vector<uint8_t> in_rank;     // [T, R]
};
ExpectedLayout expected_layout(const NormalCase& c, const RankInputs& in, int ranks_per_node);

struct ReceivedRow {
  int source = 0;
  int token = 0;
};

// What `receiver` gets from a fresh dispatch (SPEC §3.2 and the lead's semantics).
struct ExpectedDispatch {
  std::vector<ReceivedRow> rows;            // in SPEC's order
  std::vector<int64_t> recv_topk_idx;       // [rows, K]
  std::vector<float> recv_topk_weights;     // [rows, K]
  std::vector<int> per_expert;              // [L], aligned
  std::vector<int32_t> rank_prefix_matrix;  // [R, R]
};
ExpectedDispatch expected_dispatch(const NormalCase& c, const std::vector<RankInputs>& all, int receiver,
                                   int expert_alignment);

// The value an expert on `receiver` produces for (source, token): a row of random nonzero bf16 values
// that depends on all three, so sums over receivers depend on their order.
std::vector<uint16_t> expert_output_row(const NormalCase& c, int receiver, int source, int token);
// A bias row [hidden] for (rank, token, which bias).
std::vector<uint16_t> bias_row(const NormalCase& c, int rank, int token, int which);

// SPEC §3.3 for the tokens of `source`: combined_x [T, hidden] when every receiver returns
// expert_output_row, with `num_biases` (0, 1, 2) biases from bias_row. With N > 1 nodes, SPEC §3.6's
// two-level order: bf16 partial per node (ranks ascending), then bias_0 + bias_1 + partials (nodes ascending).
std::vector<uint16_t> expected_combined_x(const NormalCase& c, const std::vector<RankInputs>& all, int source,
                                          int num_biases);
// combined_topk_weights [T, K] when every receiver passes back its recv_topk_weights (N > 1: a float32
// sum per node, then over nodes ascending).
std::vector<float> expected_combined_weights(const NormalCase& c, const std::vector<RankInputs>& all, int source);

// SPEC §3.6 traffic minimum for `rank`'s dispatch: per destination node, the tokens of `rank` that go
// to at least one rank of that node (0 for its own node).
std::vector<int64_t> tokens_crossing_to_node(const NormalCase& c, const RankInputs& in);
// The combine minimum for `rank` as a forwarder (rank n*G + s%G forwards for source s into node n):
// per destination node m != own, the tokens of the source m*G + rank%G that some rank of rank's node received.
std::vector<int64_t> partials_from_forwarder(const NormalCase& c, const std::vector<RankInputs>& all, int rank);

}  // namespace epcomm::testing
