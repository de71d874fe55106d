// Where this rank's tokens go in high-throughput mode (SPEC §3.1), computed locally from the inputs:
// no communication happens here, so every check in this file fails on the rank with the bad input
// only; normal_mode.cpp then rejects the call in its exchange, so that its peers raise it too.
#pragma once

#include <cstdint>
#include <vector>

#include "core/backend.hpp"

namespace epcomm::cpu {

struct Routing {
  int num_tokens = 0;               // T
  int num_ranks = 0;                // R
  std::vector<uint8_t> in_rank;     // [T, R]: 1 when token t goes to rank r
  std::vector<int32_t> per_rank;    // [R]: tokens that go to rank r
  std::vector<int32_t> per_expert;  // [E]: (token, slot) pairs naming expert e; empty when unknown

  bool goes_to(int token, int rank) const { return in_rank[size_t(token) * num_ranks + rank] != 0; }
};

// topk_idx[t, k] of a contiguous [T, K] int64 or int32 tensor.
int64_t topk_at(const TensorView& topk_idx, int64_t token, int slot);

// Routing from topk_idx: token t goes to rank r iff some slot names an expert of r. Throws
// Error(kInvalidArgument) naming `topk_idx`, the value and its position for a value outside [-1, E).
Routing route_by_topk(const TensorView& topk_idx, int num_ranks, int num_experts, const char* op);

// The routing of a fresh dispatch: is_token_in_rank when given, else topk_idx; per-expert counts from
// topk_idx, else from num_tokens_per_expert, else none. Layout tensors the caller passed must equal
// what the routing implies (Error(kInvalidArgument) naming the tensor, the index and both values).
Routing route_for_dispatch(const DispatchArgs& args, const GroupGeometry& geometry);

// [N]: tokens with at least one destination in node n.
std::vector<int32_t> tokens_per_node(const Routing& routing, const GroupGeometry& geometry);

}  // namespace epcomm::cpu
