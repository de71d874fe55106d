// Sizes of the communication memory, shared by the host (size hints, capacity checks) and the
// backends that carve their regions out of it. Every formula lives here once.
//
// Normal mode (num_nvl_bytes), per rank, written by peers of the same node:
//   | region        | size                                              |
//   |---------------|---------------------------------------------------|
//   | control       | kNormalControlBytes (counters, flags, counts)     |
//   | queues        | R x channels x queue_tokens x token_record_bytes  |
// A queue (one per source rank and channel) holds whole token records (src/cuda/normal/protocol.hpp):
//   16 B header | payload | scales | topk idx + weights (K x 8)
// The largest record is a bf16 token with K = kMaxTopk (an fp8 token with hidden / 128 scales is
// smaller), so token_record_bytes(bf16 size) bounds every record of a call with that hidden size.
//
// Low-latency mode (num_rdma_bytes):
//   | region                   | size                                          |
//   |--------------------------|-----------------------------------------------|
//   | control                  | kLowLatencyControlBytes                       |
//   | 2 x dispatch receive     | R x T_max x ll_dispatch_slot_bytes(hidden)    |
//   | 2 x dispatch row meta    | L x R x T_max x 1 (top-k slot of each row)    |
//   | 2 x combine receive      | T_max x kMaxLowLatencyTopk x hidden x 2       |
//   | combine send / zero copy | L x R x T_max x hidden x 2                    |
#pragma once

#include <cstddef>
#include <cstdint>

#include "epcomm/config.hpp"

namespace epcomm {

constexpr int kMaxTopk = 32;            // K in normal mode
constexpr int kMaxLowLatencyTopk = 16;  // K in low-latency mode
constexpr int kMaxRanks = 1024;
constexpr int kFp8GroupSize = 128;  // channels per FP8 scale
constexpr int64_t kNormalControlBytes = int64_t(1) << 20;
constexpr int64_t kLowLatencyControlBytes = int64_t(1) << 20;

constexpr int64_t align_up(int64_t value, int64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

struct NormalLayout {
  int num_ranks = 1;
  int num_channels = 1;      // num_sms / 2
  int queue_tokens = 1;      // num_max_nvl_chunked_recv_tokens
  int64_t hidden_bytes = 0;  // bf16 size of one token

  static NormalLayout for_config(const Config& config, int64_t hidden_bytes, int num_ranks) {
    return {num_ranks, config.num_sms / 2, config.num_max_nvl_chunked_recv_tokens, hidden_bytes};
  }
  static int64_t token_record_bytes(int64_t hidden_bytes) {
    return align_up(16 + hidden_bytes + int64_t(kMaxTopk) * 8, 16);
  }
  int64_t queue_bytes() const { return int64_t(queue_tokens) * token_record_bytes(hidden_bytes); }
  int64_t total_bytes() const { return kNormalControlBytes + int64_t(num_ranks) * num_channels * queue_bytes(); }
};

struct LowLatencyLayout {
  int max_tokens_per_rank = 0;  // T_max
  int hidden = 0;
  int num_ranks = 1;
  int num_experts = 1;

  int num_local_experts() const { return num_experts / num_ranks; }
  // One received token: 16 B header, kMaxLowLatencyTopk int32 expert ids, bf16 payload (the widest).
  int64_t dispatch_slot_bytes() const { return align_up(16 + 4 * kMaxLowLatencyTopk + int64_t(hidden) * 2, 16); }
  int64_t dispatch_recv_bytes() const { return int64_t(num_ranks) * max_tokens_per_rank * dispatch_slot_bytes(); }
  int64_t dispatch_meta_bytes() const {
    return align_up(int64_t(num_local_experts()) * num_ranks * max_tokens_per_rank, 4096);
  }
  int64_t combine_recv_bytes() const { return int64_t(max_tokens_per_rank) * kMaxLowLatencyTopk * hidden * 2; }
  int64_t combine_send_bytes() const {
    return int64_t(num_local_experts()) * num_ranks * max_tokens_per_rank * hidden * 2;
  }
  int64_t parity_bytes() const { return dispatch_recv_bytes() + dispatch_meta_bytes() + combine_recv_bytes(); }

  // Offsets from the start of the low-latency memory.
  int64_t parity_offset(int parity) const { return kLowLatencyControlBytes + parity * parity_bytes(); }
  int64_t dispatch_recv_offset(int parity) const { return parity_offset(parity); }
  int64_t dispatch_meta_offset(int parity) const { return parity_offset(parity) + dispatch_recv_bytes(); }
  int64_t combine_recv_offset(int parity) const { return dispatch_meta_offset(parity) + dispatch_meta_bytes(); }
  int64_t combine_send_offset() const { return parity_offset(2); }
  int64_t total_bytes() const { return combine_send_offset() + combine_send_bytes(); }
};

}  // namespace epcomm
