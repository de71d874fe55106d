// What the host hands to the normal-mode kernels: one params struct per kernel (passed by value as a
// __grid_constant__ parameter), plus the per-rank device state they keep between calls. Plain
// structs, readable by host code that is not compiled by nvcc.
#pragma once

#include <cstdint>

#include "cuda/device/error_word.cuh"
#include "cuda/normal/protocol.hpp"

namespace epcomm::cuda {

// Device memory of one rank that only its own kernels touch. Zero at creation; the call counter
// lives here (not on the host) so that captured CUDA graphs replay correctly.
struct LocalState {
  uint64_t epoch;         // the last call this rank entered (0: none yet)
  uint32_t blocks_done;   // blocks of the running single-kernel call that finished
  int32_t skip;           // set by notify: the fresh dispatch moves no data (its calls mismatched)
  int32_t routed_tokens;  // prepare: tokens with at least one destination
  int32_t pad[3];
  int32_t channel_counts[kMaxChannels][kMaxNvlRanks];      // prepare: tokens of channel c going to rank r
  int32_t channel_prefix[kMaxChannels][kMaxNvlRanks];      // notify: sum of channel_counts over channels < c
  int32_t expert_counts[kMaxNvlRanks * kMaxLocalExperts];  // prepare: (token, slot) pairs per expert
};

// Pinned, mapped host memory: the received counts a fresh dispatch waits for on the host.
struct HostCounts {
  int32_t ready;     // the host's sequence number of the dispatch, written last
  int32_t num_recv;  // tokens this rank receives
  int32_t num_recv_per_expert[kMaxLocalExperts];
};

// Shared by the kernels that talk to peers.
struct NormalCommon {
  char* peers[kMaxNvlRanks];  // normal-mode memory of each rank of the node, this rank included
  int32_t rank;               // this rank (one node: rank in the node == rank in the group)
  int32_t num_ranks;          // R
  QueueGeometry queues;       // C channels, Q slots, record size of this call
  RecordLayout record;        // what a record of this call holds
  int32_t chunk_tokens;       // records a sender writes before publishing them (<= Q)
  uint64_t timeout_ns;
  DeviceErrorSink errors;
  LocalState* state;
};

// Token analysis: get_dispatch_layout, and the first step of a fresh dispatch.
struct RoutingParams {
  const void* topk_idx;  // [T, K] int64 or int32, or null
  int32_t topk_is_int64;
  int32_t num_topk;              // K
  const uint8_t* in_rank_given;  // [T, R] bool: the caller's is_token_in_rank (routing), or null
  int32_t num_tokens;            // T
  int32_t num_ranks;             // R
  int32_t num_experts;           // E (> 0 when topk_idx is given)
  int32_t ranks_per_node;        // G
  uint8_t* in_rank;              // [T, R] bool out, zeroed before the kernel
  int32_t* rank_counts;          // [R] out (atomics, zeroed before), or null
  int32_t* node_counts;          // [N] out (atomics, zeroed before), or null
  int32_t* expert_counts;        // [E] out (atomics, zeroed before), or null
  int32_t* block_rank_counts;    // [gridDim][kMaxNvlRanks] out (plain stores, R <= 8), or null
  int32_t* routed_tokens;        // out (atomic, zeroed before), or null
  DeviceErrorSink errors;
  DevicePhase phase;
};

// Count exchange of a fresh dispatch (one block).
struct NotifyParams {
  NormalCommon common;
  uint64_t signature;
  int32_t num_tokens;
  int32_t num_worst_tokens;
  int32_t num_experts;                 // E, 0 when unknown
  int32_t num_local_experts;           // L = E / R, 0 when no per-expert counts travel
  const int32_t* expert_counts;        // [E] this rank's per-expert counts (computed or given), or null
  const int32_t* check_rank_counts;    // [R] caller's num_tokens_per_rank to verify, or null
  const int32_t* check_node_counts;    // [1] caller's num_tokens_per_rdma_rank to verify, or null
  const int32_t* check_expert_counts;  // [E] caller's num_tokens_per_expert to verify, or null
  int32_t* rank_prefix_matrix;         // [R, R] out (handle)
  int32_t* handle_meta;                // [R + 2] out (handle): T of every rank, epoch low, epoch high
  HostCounts* host;                    // null: nobody waits on the host (num_worst_tokens)
  int32_t host_sequence;
};

// Dispatch, fresh or cached (2 C blocks: even = sender of channel c, odd = receiver).
struct DispatchParams {
  NormalCommon common;
  int32_t cached;              // 1: entry barrier here; rows from send_row
  uint64_t signature;          // cached only (fresh: notify compared them)
  const int32_t* handle_meta;  // cached only: the handle's dispatch epoch
  int32_t num_tokens;          // T
  // sender side
  const uint8_t* x;       // [T, payload_bytes] contiguous
  const float* x_scales;  // [T, S] with strides below, or null
  int64_t scale_stride_token;
  int64_t scale_stride_scale;
  const void* topk_idx;  // [T, K] or null
  int32_t topk_is_int64;
  const float* topk_weights;          // [T, K] or null
  int32_t num_experts;                // E (values outside [0, E) travel as -1)
  int32_t num_local_experts;          // L
  const uint8_t* in_rank;             // [T, R] handle routing
  int32_t* send_row;                  // [T, R] handle: written (fresh) or read (cached)
  const int32_t* rank_prefix_matrix;  // [R, R] (fresh: this rank's first row in each receiver)
  // receiver side
  int32_t num_rows;       // rows of the outputs
  int32_t drop_overflow;  // 1 (num_worst_tokens): rows >= num_rows are dropped, not an error
  uint8_t* recv_x;        // [num_rows, payload_bytes]
  float* recv_scales;     // [num_rows, S] or, column-major, [S, num_rows]; or null
  int32_t scales_column_major;
  int64_t* recv_topk_idx;    // [num_rows, K] or null
  float* recv_topk_weights;  // [num_rows, K] or null
  int32_t* recv_src_idx;     // [num_rows] or null (cached)
  int32_t fill_empty_rows;   // 1: rows past the real count get idx -1, weight 0, src -1
};

// Combine (2 C blocks: even = sender of channel c, odd = receiver).
struct CombineParams {
  NormalCommon common;
  uint64_t signature;
  const int32_t* handle_meta;         // [R + 2]: T of every rank, dispatch epoch
  const int32_t* rank_prefix_matrix;  // [R, R]
  // sender side: this rank's received rows, sent back to their source ranks
  const uint16_t* x;            // [num_recv_rows, hidden] bf16
  int32_t num_recv_rows;        // rows of x (rows past it are never read, whatever the handle says)
  const float* topk_weights;    // [num_recv, K] or null
  const int32_t* recv_src_idx;  // [num_recv]
  // receiver side: this rank's tokens
  int32_t num_tokens;  // T
  int32_t hidden;
  const uint8_t* in_rank;   // [T, R]
  const uint16_t* bias0;    // [T, hidden] or null
  const uint16_t* bias1;    // [T, hidden] or null
  uint16_t* combined_x;     // [T, hidden]
  float* combined_weights;  // [T, K] or null
  int32_t window_tokens;    // tokens a receiver block handles between head updates (<= Q)
};

}  // namespace epcomm::cuda
