// The two-level combine when the group spans N > 1 nodes (SPEC §3.6), the reverse of
// normal_internode_dispatch.hpp: the ranks of a node that received a token publish their rows; the
// node's forwarder for the token's source (rank n*G + s%G) reduces them into one bf16 partial
// p_n[t] and puts that one row per (token, node) into the source's inbox; the source adds the bias
// and the partials of the nodes in ascending order. The source is its own node's forwarder.
//
// Numerics (deterministic, SPEC §3.6): p_n[t] = bf16(0 + row_r0 + row_r1 + ...) over the ranks of n
// that received t, ascending, in float32; combined_x[t] = bf16((b0 + b1) + p_n0 + p_n1 + ...) with an
// absent bias read as 0 and nodes ascending. Weights: per node a float32 sum (0 + ranks ascending),
// then 0 + the nodes' sums ascending.
//
// The area during one round of source tokens [begin, begin + W):
//   | Slice [R], one per source rank | published rows: | int32 token, pad 16 | bf16 x [hidden] |
//   |                                  float32 weights [K] | (padded to 16), runs sorted by token   |
//   | inbox: N-1 slots, one per other node n (ascending): the partials n's forwarder put here:     |
//   |        | int32 count, pad 16 | W entries of | int32 token, pad 16 | bf16 p_n [hidden] |      |
//   |        float32 weights [K] | (padded to 16), in ascending token order                       |
// The count and token indices are control words (not counted as network bytes, as dispatch's count):
// the source checks every partial against its send_row, and the rows every rank published lie inside
// its area; a fault raises kPeerFailure after the rounds (a receiver never trusts its senders).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/normal_combine.hpp"

namespace epcomm::cpu {

// Bytes the area needs for a round of one source token.
size_t internode_combine_min_bytes(int num_ranks, int num_nodes, int hidden, int num_topk);

// Bytes one partial row puts on the network: bf16 x [hidden] and float32 weights [K].
size_t network_bytes_per_partial(int hidden, int num_topk);

// Collective. Fills work.combined_x / combined_weights with the two-level sums. Returns [N]: bytes
// this rank put on the network per destination node (0 for its own node).
std::vector<int64_t> combine_rows_across_nodes(const Area& area, GroupSync& sync, const GroupGeometry& geometry,
                                               const CombineWork& work, const char* op);

}  // namespace epcomm::cpu
