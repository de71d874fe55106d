// Bringing received rows back to their source ranks and reducing them, in rounds; see normal_mode.hpp.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/cpu_context.hpp"

namespace epcomm::cpu {

// What this rank contributes (as a receiver of the dispatch) and what it reduces (as a source).
struct CombineWork {
  const DispatchHandle* handle = nullptr;
  const uint16_t* x = nullptr;                   // [num_recv, hidden] bf16 bits, dispatch's row order
  const float* topk_weights = nullptr;           // [num_recv, K] or null
  const uint16_t* bias[2] = {nullptr, nullptr};  // [T, hidden] bf16 bits or null
  int hidden = 0;
  int num_topk = 0;                   // K of topk_weights, 0 when not given
  uint16_t* combined_x = nullptr;     // [T, hidden]
  float* combined_weights = nullptr;  // [T, K] or null
};

// Bytes the area needs for one round of one source token.
size_t combine_min_bytes(int num_ranks, int hidden, int num_topk);

// Collective. combined_x[t] = bf16(((0 + row_r0) + row_r1) + ... + bias_0 + bias_1) over the ranks
// r0 < r1 < ... that received t; combined_weights[t] = 0 + the same sum of their weight rows.
void combine_rows(const Area& area, GroupSync& sync, int rank, const CombineWork& work, const char* op);

}  // namespace epcomm::cpu
