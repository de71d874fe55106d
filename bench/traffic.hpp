// Normal mode across emulated nodes (SPEC §3.6): the bytes each rank put on the (emulated) network,
// as the CPU backend measures them (DispatchResult / CombineResult::network_bytes_per_node), against
// SPEC's minimum for the routing: each token once per destination node other than its own, and in
// combine one row per (token, node) back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "measure.hpp"
#include "oracle.hpp"

namespace epcomm::bench {

// Bytes one token crossing to a node costs on the CPU backend's transport: its token index (int32)
// and its record (x, top-k int64 + float32 weights, scales, routing flags [R], padded to 16 bytes).
int64_t dispatch_bytes_per_token(int64_t x_bytes, int num_scales, int num_topk, bool with_weights, int num_ranks);
// Bytes of one partial row in combine: bf16 x [hidden] and float32 weights [K].
int64_t combine_bytes_per_row(int hidden, int num_topk);

// [N]: tokens of `rank` with a destination in node n, n != rank's node, times bytes_per_token.
std::vector<int64_t> dispatch_minimum(const Routing& routing, int rank, int ranks_per_node, int64_t bytes_per_token);
// [N]: as the forwarder of its node for source m*G + rank%G, one row per token of that source some
// rank of rank's node received, times bytes_per_row (0 for rank's own node).
std::vector<int64_t> combine_minimum(const Routing& routing, int rank, int ranks_per_node, int64_t bytes_per_row);

// Collective: gathers every rank's measured and minimum totals, notes them on rank 0 (bytes per rank
// min / median / max and the ratio to the minimum) and counts a failure on every rank when any
// rank's ratio is not exactly 1.
void report_traffic(BenchContext& ctx, const std::string& what, const std::vector<int64_t>& measured,
                    const std::vector<int64_t>& minimum);

}  // namespace epcomm::bench
