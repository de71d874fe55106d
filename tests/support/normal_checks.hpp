// Running high-throughput calls on one rank of a test and checking every output against the naive
// reference (normal_reference.hpp), bit for bit. Failures are reported through gtest.
#pragma once

#include <chrono>
#include <optional>

#include "epcomm/buffer.hpp"
#include "reference/normal_reference.hpp"

namespace epcomm::testing {

enum class RoutingInput {
  kTopkOnly,      // topk_idx (+ weights); the backend computes the layout
  kWithLayout,    // plus every tensor get_dispatch_layout returned
  kFlagsOnly,     // is_token_in_rank only (no topk_idx); needs NormalCase::random_route_flags
  kFlagsAndTopk,  // is_token_in_rank decides, topk_idx (unrelated to it) only labels the rows
};

struct DispatchOptions {
  RoutingInput routing = RoutingInput::kTopkOnly;
  bool with_weights = true;
  bool int32_topk = false;
  bool column_major_scales = false;  // fp8: x_scales given as a transposed [S, T] buffer
  int expert_alignment = 1;
  int num_worst_tokens = 0;
};

// One rank's inputs presented as the options ask (owns the storage the views point to).
struct RankCall {
  RankInputs inputs;
  std::vector<int32_t> topk_idx_int32;
  std::vector<float> scales_column_major;  // [S, T]
  std::optional<LayoutResult> layout;
  DispatchInputs dispatch;
};
// `buffer` is used only for get_dispatch_layout with RoutingInput::kWithLayout.
void prepare_call(RankCall& call, const NormalCase& c, const DispatchOptions& o, Buffer& buffer);

BufferOptions cpu_buffer_options(int64_t num_nvl_bytes, std::chrono::milliseconds timeout = std::chrono::seconds(60));
// Enough normal-mode memory for the case in a few rounds (not the hint: tests keep segments small).
int64_t small_nvl_bytes(const NormalCase& c);

// Checks a fresh dispatch's outputs and handle on `rank` against the reference.
void check_dispatch(const NormalCase& c, const std::vector<RankInputs>& all, int rank, const DispatchOptions& o,
                    const DispatchResult& result);

// [rows, hidden] bf16: expert_output_row for every row the reference says `rank` received.
std::vector<uint16_t> expert_outputs(const NormalCase& c, const ExpectedDispatch& expected, int rank, int num_rows);

// Runs combine with expert_outputs (and the dispatch's recv_topk_weights, `num_biases` biases) and
// checks it against the reference. Returns the result for further comparisons.
CombineResult combine_and_check(Buffer& buffer, const NormalCase& c, const std::vector<RankInputs>& all, int rank,
                                const DispatchResult& dispatched, int num_biases);

// Cached dispatch of a fresh tagged bf16 tensor with the handle, checked row by row.
void cached_dispatch_and_check(Buffer& buffer, const NormalCase& c, const std::vector<RankInputs>& all, int rank,
                               const DispatchHandle& handle);

// A whole round trip on one rank: dispatch, checks, combine, checks, cached dispatch, checks.
void round_trip(Buffer& buffer, const NormalCase& c, const DispatchOptions& o, int num_biases);

// True when every byte of two tensors' logical elements is equal.
bool same_bytes(const TensorView& a, const TensorView& b);
// True when `flags` holds exactly `expected` (either may be empty: T = 0).
bool same_flags(const TensorView& flags, const std::vector<uint8_t>& expected);

}  // namespace epcomm::testing
