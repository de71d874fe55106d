// Inputs, results and handles of every Buffer operation (SPEC §3, §4). Named fields instead of
// positional tuples; the PyTorch front end rebuilds DeepEP's tuples from these.
//
// Shapes use SPEC's letters: R ranks, E experts, L = E / R local experts, T tokens on this rank,
// K top-k slots, N nodes, T_max = num_max_dispatch_tokens_per_rank.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "epcomm/config.hpp"
#include "epcomm/event.hpp"
#include "epcomm/tensor.hpp"

namespace epcomm {

// How a call orders itself against the caller's work (SPEC §3.4).
struct StreamOptions {
  StreamHandle stream = nullptr;          // the caller's current stream
  const Event* previous_event = nullptr;  // wait for this instead of for `stream`
  bool async_finish = false;              // false: `stream` waits for the call's work before it returns
  bool allocate_on_comm_stream = false;   // outputs are allocated for the comm stream instead of `stream`
  Allocator* allocator = nullptr;         // creates the outputs; nullptr = default_allocator()
};

// ---- high-throughput mode ----------------------------------------------------------------------

struct LayoutResult {
  Tensor num_tokens_per_rank;                      // [R] int32
  std::optional<Tensor> num_tokens_per_rdma_rank;  // [N] int32; empty when N == 1
  Tensor num_tokens_per_expert;                    // [E] int32
  Tensor is_token_in_rank;                         // [T, R] bool
  Event event;
};

// Everything combine and cached dispatch need to repeat a dispatch's routing. Produced by dispatch;
// treat as opaque except rank_prefix_matrix. Tied to the Buffer that made it.
struct DispatchHandle {
  int num_ranks = 0;
  int num_tokens = 0;         // T on this rank when the handle was made
  int num_recv_tokens = 0;    // rows of recv_x on this rank
  int num_topk = 0;           // K of the routing (0 when dispatched without topk_idx)
  Tensor rank_prefix_matrix;  // [R, R] int32: [i][j] = tokens rank j receives from ranks 0..i
  Tensor is_token_in_rank;    // [T, R] bool: sender side routing
  Tensor send_row;            // [T, R] int32: row of token t in rank r's recv_x, or -1
  Tensor recv_src_idx;        // [num_recv] int32: each received row's token index on its source
  // Across nodes (N > 1, SPEC §3.6); empty when N == 1. Rows of source s are [prefix[s-1], prefix[s]).
  std::optional<Tensor> recv_gbl_rank_prefix_sum;   // [R] int32: inclusive prefix over source ranks of rows received
  std::optional<Tensor> recv_rdma_rank_prefix_sum;  // [N] int32: the same over source nodes
  std::shared_ptr<const void> backend_state;        // the backend's own (e.g. per-channel prefixes)
  // The unique id of the Buffer that made it (a process-wide counter, never reused: a handle of a
  // destroyed Buffer is rejected by a new one even at the same address). Checked on use.
  uint64_t buffer_id = 0;
};

struct DispatchInputs {
  TensorView x;                        // [T, hidden] bf16, or float8_e4m3 with x_scales
  std::optional<TensorView> x_scales;  // [T, S] float32 (S = hidden / 128), any strides; fp8 only
  // Fresh routing: topk_idx and/or is_token_in_rank. Layout tensors not given are computed.
  std::optional<TensorView> topk_idx;                  // [T, K] int64 or int32, -1 = empty slot
  std::optional<TensorView> topk_weights;              // [T, K] float32
  std::optional<TensorView> num_tokens_per_rank;       // [R] int32 (from get_dispatch_layout)
  std::optional<TensorView> num_tokens_per_rdma_rank;  // [N] int32
  std::optional<TensorView> is_token_in_rank;          // [T, R] bool
  std::optional<TensorView> num_tokens_per_expert;     // [E] int32
  // Cached dispatch: the routing of an earlier call; topk_* and the layout must then be empty.
  const DispatchHandle* handle = nullptr;
  int num_experts = 0;           // E; taken from num_tokens_per_expert when that is given
  int expert_alignment = 1;      // per-expert counts are rounded up to a multiple of this
  int num_worst_tokens = 0;      // > 0: outputs have exactly this many rows, no host sync
  std::optional<Config> config;  // nullptr = default_dispatch_config(R)
};

struct DispatchResult {
  Tensor recv_x;                                 // [num_recv, hidden], dtype of x
  std::optional<Tensor> recv_x_scales;           // [num_recv, S] float32, same majorness as x_scales
  std::optional<Tensor> recv_topk_idx;           // [num_recv, K] int64, local expert index or -1
  std::optional<Tensor> recv_topk_weights;       // [num_recv, K] float32, 0 where idx is -1
  std::vector<int> num_recv_tokens_per_expert;   // [L], aligned; empty with num_worst_tokens or cached
  std::shared_ptr<const DispatchHandle> handle;  // nullptr for a cached dispatch
  // Debug / bench counter, CPU backend with N > 1 only (else empty): [N] bytes this rank put on the
  // (emulated) network for each destination node during this call; 0 for its own node. Measured:
  // the bytes the two-level transport copied across node boundaries (docs/ARCHITECTURE.md).
  std::vector<int64_t> network_bytes_per_node;
  Event event;  // complete unless async_finish
};

struct CombineInputs {
  TensorView x;                            // [num_recv, hidden] bf16, rows in dispatch's order
  const DispatchHandle* handle = nullptr;  // required
  std::optional<TensorView> topk_weights;  // [num_recv, K] float32
  std::optional<TensorView> bias_0;        // [T, hidden] bf16
  std::optional<TensorView> bias_1;        // [T, hidden] bf16
  std::optional<Config> config;
};

struct CombineResult {
  Tensor combined_x;                            // [T, hidden] bf16
  std::optional<Tensor> combined_topk_weights;  // [T, K] float32
  std::vector<int64_t> network_bytes_per_node;  // [N], as DispatchResult's (bytes of per-node partials sent)
  Event event;
};

// ---- low-latency mode --------------------------------------------------------------------------

// Launches the receive half of a low-latency call on `stream` (SPEC §4.3). Empty unless the call
// asked for return_recv_hook. Call at most once.
class RecvHook {
 public:
  RecvHook() = default;
  explicit RecvHook(std::function<void(StreamHandle)> run) : run_(std::move(run)) {}
  explicit operator bool() const { return static_cast<bool>(run_); }
  void operator()(StreamHandle stream = nullptr);

 private:
  std::function<void(StreamHandle)> run_;
};

struct LowLatencyOptions {
  StreamHandle stream = nullptr;  // the caller's current stream; the call runs on it
  bool async_finish = false;      // record and return an event (exclusive with return_recv_hook)
  bool return_recv_hook = false;  // issue only the sends; run the receive half with the hook
  Allocator* allocator = nullptr;
};

// SPEC §4.1's handle, field for field.
struct LowLatencyHandle {
  Tensor src_info;      // [L, R*T_max] int32: token index on its source rank
  Tensor layout_range;  // [L, R] int64: (begin << 32) | count of rows from rank r
  int num_max_dispatch_tokens_per_rank = 0;
  int hidden = 0;
  int num_experts = 0;
  // The unique id of the Buffer whose low_latency_dispatch made it; 0 = unknown (a handle rebuilt
  // from DeepEP's tuple), accepted on the strength of its shape checks alone.
  uint64_t buffer_id = 0;
};

struct LowLatencyDispatchInputs {
  TensorView x;                              // [T, hidden] bf16, T <= T_max
  TensorView topk_idx;                       // [T, K] int64 or int32, -1 = empty slot
  int num_max_dispatch_tokens_per_rank = 0;  // T_max
  int num_experts = 0;
  std::optional<TensorView> cumulative_local_expert_recv_stats;  // [L] int32, += recv_count
  std::optional<TensorView> dispatch_wait_recv_cost_stats;       // [R] int64, += wait ns per source
  bool use_fp8 = true;
  bool round_scale = false;  // scales are powers of two
  bool use_ue8m0 = false;    // scales packed as exponent bytes (needs round_scale)
};

struct LowLatencyDispatchResult {
  Tensor recv_x;                        // [L, R*T_max, hidden] bf16 or float8_e4m3
  std::optional<Tensor> recv_x_scales;  // fp8: [L, R*T_max, hidden/128] float32 or
                                        // [L, R*T_max, hidden/512] int32 (ue8m0); last two dims column-major
  Tensor recv_count;                    // [L] int32
  LowLatencyHandle handle;
  Event event;
  RecvHook hook;
};

struct LowLatencyCombineInputs {
  TensorView x;             // [L, R*T_max, hidden] bf16 in dispatch's layout
  TensorView topk_idx;      // [T, K] as given to the dispatch
  TensorView topk_weights;  // [T, K] float32
  const LowLatencyHandle* handle = nullptr;
  bool use_logfmt = false;                                 // LogFMT rows (docs/LOGFMT.md); CPU backend only
  bool zero_copy = false;                                  // x was written into next_low_latency_combine_buffer()
  std::optional<TensorView> out;                           // [T, hidden] bf16 to write into
  std::optional<TensorView> combine_wait_recv_cost_stats;  // [R] int64, += wait ns per source
};

struct LowLatencyCombineResult {
  Tensor combined_x;  // [T, hidden] bf16 (the `out` tensor when given)
  Event event;
  RecvHook hook;
};

}  // namespace epcomm
