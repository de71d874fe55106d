// What the CPU backend keeps in a DispatchHandle beyond its public fields, and how its tensors read.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

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
  const auto* prefix = handle.rank_prefix_matrix.data_as<const int32_t>();
  return source == 0 ? 0 : prefix[(source - 1) * handle.num_ranks + receiver];
}

}  // namespace epcomm::cpu
