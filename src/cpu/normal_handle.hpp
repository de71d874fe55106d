// What the CPU backend keeps in a DispatchHandle beyond its public fields, and how its tensors read.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "core/semantics.hpp"
#include "epcomm/ops.hpp"

namespace epcomm::cpu {

// DispatchHandle::backend_state of the CPU backend.
struct NormalHandleState {
  uint64_t dispatch_step = 0;       // GroupSync step of the dispatch's exchange: equal on every rank
  std::vector<int32_t> num_tokens;  // [R]: T of every rank in that dispatch
};

inline const NormalHandleState& handle_state(const DispatchHandle& handle) {
  return *static_cast<const NormalHandleState*>(handle.backend_state.get());
}

// The first row in `receiver`'s recv_x of the tokens from `source` (rank_prefix_matrix, SPEC §3.2).
inline int32_t first_row_from(const DispatchHandle& handle, int source, int receiver) {
  const std::span<const int32_t> prefix(handle.rank_prefix_matrix.data_as<const int32_t>(),
                                        size_t(handle.num_ranks) * handle.num_ranks);
  return semantics::first_row_from(prefix, handle.num_ranks, source, receiver);
}

}  // namespace epcomm::cpu
