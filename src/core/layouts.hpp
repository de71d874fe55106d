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
// Low-latency mode (num_rdma_bytes, symmetric memory: every rank has the same layout):
//   | region                    | size                                              | written by
//   |---------------------------|---------------------------------------------------|------------
//   | control                   | kLowLatencyControlBytes (flags, counters)         | peers (flags), owner
//   | parity 0 block            | parity_bytes(), right after control               |
//   |   ... free space when num_rdma_bytes > the hint ...                           |
//   | parity 1 block            | parity_bytes(), ending at the end of the buffer   |
// A parity block:
//   |   dispatch receive        | R x T_max x dispatch_slot_bytes(hidden)           | peers
//   |   dispatch row meta       | L x R x T_max x 1 (top-k slot of each row)        | owner
//   |   combine receive         | T_max x kMaxLowLatencyTopk x hidden x 2           | peers
//   |   dispatch messages       | R x dispatch_message_bytes (per-expert counts)    | peers
//   |   dispatch staging        | T_max slots + R messages (puts to ranks without NVLink) | owner
// Parity 1 is anchored at the end of the buffer so that calls with different (T_max, hidden, E)
// never make the two parity blocks overlap, as long as the buffer holds each shape's hint.
// A dispatch slot: 16 B header (token, K), kMaxLowLatencyTopk int32 global expert ids, as many int32
// row offsets, then the payload (fp8 bytes + float scales, or bf16: the wider one is reserved).
//
// The combine send / zero-copy region [L, R x T_max, hidden] bf16 (zero_copy_bytes()) is NOT part of
// num_rdma_bytes: the GPU backend reads expert outputs straight from `x` for NVLink peers, so that
// region is only allocated (as ordinary device memory of the rank) when zero-copy combine is used
// or some peer is reached through NVSHMEM puts. It is by far the largest region (E x T_max x
// hidden x 2 bytes), so leaving it out keeps the buffer small.
#pragma once

#include <cstddef>
#include <cstdint>

#include "epcomm/config.hpp"

namespace epcomm {

constexpr int kMaxTopk = 32;            // K in normal mode
constexpr int kMaxLowLatencyTopk = 16;  // K in low-latency mode
constexpr int kMaxRanks = 1024;
constexpr int kMaxRanksPerNode = 8;  // G (SPEC §1)
constexpr int kFp8GroupSize = 128;   // channels per FP8 scale
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
  int64_t buffer_bytes = 0;  // size of the buffer (num_rdma_bytes); 0: exactly total_bytes()

  int num_local_experts() const { return num_experts / num_ranks; }
  int64_t num_rows() const { return int64_t(num_ranks) * max_tokens_per_rank; }  // R x T_max
  // One received token: header, ids and row offsets, then the payload (bf16, the widest).
  static constexpr int64_t kSlotHeaderBytes = 16 + 2 * 4 * kMaxLowLatencyTopk;
  int64_t dispatch_slot_bytes() const { return align_up(kSlotHeaderBytes + int64_t(hidden) * 2, 16); }
  int64_t dispatch_recv_bytes() const { return num_rows() * dispatch_slot_bytes(); }
  int64_t dispatch_meta_bytes() const { return align_up(int64_t(num_local_experts()) * num_rows(), 4096); }
  int64_t combine_recv_bytes() const { return int64_t(max_tokens_per_rank) * kMaxLowLatencyTopk * hidden * 2; }
  // What a source tells a destination about one dispatch: 16 B header (tokens), one int32 count per
  // local expert of the destination, one bit per source token (does it come to this destination).
  int64_t dispatch_message_bytes() const {
    return align_up(16 + 4 * int64_t(num_local_experts()) + 4 * ((int64_t(max_tokens_per_rank) + 31) / 32), 16);
  }
  int64_t dispatch_messages_bytes() const { return int64_t(num_ranks) * dispatch_message_bytes(); }
  int64_t staging_bytes() const {
    return int64_t(max_tokens_per_rank) * dispatch_slot_bytes() + dispatch_messages_bytes();
  }
  int64_t parity_bytes() const {
    return align_up(dispatch_recv_bytes() + dispatch_meta_bytes() + combine_recv_bytes() + dispatch_messages_bytes() +
                        staging_bytes(),
                    4096);
  }

  // Offsets from the start of the low-latency memory.
  int64_t parity_offset(int parity) const {
    const int64_t end = buffer_bytes > 0 ? buffer_bytes : total_bytes();
    return parity == 0 ? kLowLatencyControlBytes : (end - parity_bytes()) / 4096 * 4096;
  }
  int64_t dispatch_recv_offset(int parity) const { return parity_offset(parity); }
  int64_t dispatch_meta_offset(int parity) const { return parity_offset(parity) + dispatch_recv_bytes(); }
  int64_t combine_recv_offset(int parity) const { return dispatch_meta_offset(parity) + dispatch_meta_bytes(); }
  int64_t dispatch_messages_offset(int parity) const { return combine_recv_offset(parity) + combine_recv_bytes(); }
  int64_t staging_offset(int parity) const { return dispatch_messages_offset(parity) + dispatch_messages_bytes(); }
  int64_t total_bytes() const { return kLowLatencyControlBytes + 2 * parity_bytes(); }

  // The zero-copy combine region [L, R x T_max, hidden] bf16, allocated apart from num_rdma_bytes.
  int64_t zero_copy_bytes() const { return int64_t(num_local_experts()) * num_rows() * hidden * 2; }
};

}  // namespace epcomm
