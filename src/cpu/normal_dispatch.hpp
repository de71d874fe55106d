// Moving tokens for a dispatch (fresh or cached) in rounds; see normal_mode.hpp for the protocol.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/layouts.hpp"
#include "cpu/cpu_context.hpp"

namespace epcomm::cpu {

// One token as a dispatch round publishes it. Every rank agreed on the fields that size it.
//   | x (x_bytes) | topk_idx int64 [K] | topk_weights float32 [K] | scales [S] (4-byte words) | flags uint8 [R] |
// x_bytes is a multiple of 16 (checked by the front), so every field is naturally aligned.
struct TokenRecord {
  size_t x_bytes = 0;        // hidden x dtype size
  int num_scales = 0;        // S; 0 for bf16
  int num_topk = 0;          // K; 0 when no top-k travels (cached dispatch, or none given)
  bool has_weights = false;  // topk_weights travel
  int num_ranks = 0;         // flags[r] = 1: the token goes to rank r

  size_t topk_offset() const { return x_bytes; }
  size_t weights_offset() const { return topk_offset() + size_t(num_topk) * sizeof(int64_t); }
  size_t scales_offset() const { return weights_offset() + (has_weights ? size_t(num_topk) * sizeof(float) : 0); }
  size_t flags_offset() const { return scales_offset() + size_t(num_scales) * sizeof(float); }
  size_t bytes() const { return static_cast<size_t>(align_up(int64_t(flags_offset()) + num_ranks, 16)); }
};

// The sending side of this rank.
struct DispatchSend {
  const DispatchInputs* inputs = nullptr;  // x, x_scales, topk_idx, topk_weights of this rank
  const uint8_t* in_rank = nullptr;        // [T, R]: where each token goes
  int num_tokens = 0;                      // T
};

// The receiving side of this rank: where received tokens land. Pointers are null for absent outputs.
struct DispatchReceive {
  std::byte* x = nullptr;          // [rows, hidden]
  TensorView scales;               // [rows, S] float32 or int32, row- or column-major (written through strides)
  int64_t* topk_idx = nullptr;     // [rows, K]: local expert index or -1
  float* topk_weights = nullptr;   // [rows, K]: 0 where the index is -1
  int32_t* src_idx = nullptr;      // [rows]: token index on the source
  int num_rows = 0;                // rows allocated (num_worst_tokens when > 0)
  int rank = 0;                    // the receiving rank: it holds experts [rank * L, (rank + 1) * L)
  int num_local_experts = 0;       // L
  std::vector<int32_t> first_row;  // [R]: first row of each source's tokens
  std::vector<int32_t> end_row;    // [R]: one past the last row of each source's tokens (<= num_rows)
};

// Writes token `token` of the sending side as a record at `record`.
void write_record(const TokenRecord& format, std::byte* record, const DispatchSend& send, int token);
// Copies one received record of source token `token` into row `row`, keeping only the top-k slots of
// local experts.
void read_record(const TokenRecord& format, const std::byte* record, DispatchReceive& out, int64_t row, int token);
// Marks row `row` empty (num_worst_tokens padding): x and scales 0, topk_idx -1, weights 0, src_idx -1.
void clear_row(const TokenRecord& format, DispatchReceive& out, int64_t row);

// Collective. Moves every rank's tokens to their receivers in rounds, then marks rows past the real
// ones (num_worst_tokens) as empty: x and scales 0, topk_idx -1, weights 0, src_idx -1.
// `num_tokens` holds every rank's T. A receiver never trusts its senders: a source that flags more
// or fewer tokens for it than its rows [first_row, end_row) hold writes nothing outside them, and
// the call throws Error(kPeerFailure) naming it once the rounds are over.
void move_tokens(const Area& area, GroupSync& sync, int rank, const TokenRecord& record, const DispatchSend& send,
                 DispatchReceive& receive, const std::vector<int32_t>& num_tokens, const char* op);

}  // namespace epcomm::cpu
