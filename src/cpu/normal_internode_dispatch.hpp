// The two-level transport of a dispatch when the group spans N > 1 nodes (SPEC §3.6).
//
// A token crosses the "network" (the boundary between emulated nodes) once per destination node: its
// source puts it into the inbox of that node's forwarding rank, the rank of the node with the
// source's local index (rank n*G + s%G), and the ranks of that node read it there (NVLink inside the
// node). Ranks of the source's own node read the source's records directly. Every put across a node
// boundary is counted, so the traffic counter is measured, not computed.
//
// The area during one round of W source tokens [begin, begin + W):
//   | window: W TokenRecords, token begin+i at i          (read by ranks of this rank's node)     |
//   | inbox: N-1 slots, one per other node m (ascending): the entries the forwarded source on m   |
//   |        (rank m*G + this rank's local index) put here: | int32 count, pad to 16 |             |
//   |        W entries of | int32 token, pad to 16 | TokenRecord |, in ascending token order        |
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/normal_dispatch.hpp"

namespace epcomm::cpu {

// Bytes the area needs for a round of one token when the group has `num_nodes` nodes.
size_t internode_dispatch_min_bytes(const TokenRecord& record, int num_nodes);

// Bytes one forwarded token puts on the network: its token index (int32) and its record.
size_t network_bytes_per_token(const TokenRecord& record);

// Collective. The same contract and results as move_tokens (rows in SPEC's order, padding rows past
// the real ones), moved in two levels. Returns [N]: bytes this rank put on the network per
// destination node (0 for its own node).
std::vector<int64_t> move_tokens_across_nodes(const Area& area, GroupSync& sync, const GroupGeometry& geometry,
                                              const TokenRecord& record, const DispatchSend& send,
                                              DispatchReceive& receive, const std::vector<int32_t>& num_tokens,
                                              const char* op);

}  // namespace epcomm::cpu
