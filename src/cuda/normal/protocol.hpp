// The shared-memory protocol of high-throughput mode on GPUs: where everything lives in a rank's
// normal-mode memory (num_nvl_bytes, shared with the ranks of its node through CUDA IPC) and how
// counters are encoded. Used by the host (sizes, capacity checks) and the kernels (addresses).
//
// A rank's memory:
//   | control (kNormalControlBytes)                                | queues                       |
//   | call records | tails [8][kMaxChannels] | heads [8][kMaxChannels] | expert counts | R x C x Q records |
//
// - call record [parity][source]: what `source` announced for its call number `epoch` (written by the
//   source, epoch last with release): the call's signature (kind, row size, dtype, K, scales), its
//   queue geometry (C, Q), the handle's dispatch epoch, its T, num_worst_tokens and token counts.
//   Every call starts with every rank writing its record into every peer and waiting for all records
//   (the entry barrier); since a rank enters call e only after its call e-1 finished, nobody touches
//   queues of call e-1 any more once the barrier of call e passed, whatever C and Q call e uses. Ranks
//   whose records disagree all see it and all skip the data phase (kMismatch). Two parities suffice:
//   a source can be at most one call ahead of a reader. The call counter (epoch) lives in device
//   memory (LocalState), so captured CUDA graphs replay correctly.
// - tails[source][channel] in the RECEIVER's memory: records the source has published into the queue
//   (source, channel); heads[receiver][channel] in the SENDER's memory: records the receiver has
//   consumed. Each counter lives where it is polled, and is written over NVLink by the other side.
//   Values carry the call epoch in the high 32 bits, so no reset is ever needed between calls:
//     tail = epoch << 32 | done << 31 | count        head = epoch << 32 | count
// - expert counts [parity][source][L]: a fresh dispatch's per-expert counts for the receiver's experts.
// - queue (source, channel) in the receiver's memory: Q record slots used as a ring, slot = index % Q.
//
// Records (one token):  | header 16 B | payload | scales (4 S, padded to 16) | idx (4 K) | weights (4 K) | pad |
//   dispatch header = {row in the receiver's recv_x, source token index, 0, 0}; combine header = {token
//   index on the receiver, row on the sender, 0, 0}.
#pragma once

#include <cstdint>

#include "core/layouts.hpp"

#if defined(__CUDACC__)
#define EPCOMM_PROTOCOL_FN __host__ __device__ __forceinline__
#else
#define EPCOMM_PROTOCOL_FN inline
#endif

namespace epcomm::cuda {

constexpr int kMaxNvlRanks = 8;    // G <= 8 (SPEC §1)
constexpr int kMaxChannels = 128;  // num_sms / 2
constexpr int64_t kCallRecordBytes = 128;
constexpr int64_t kCallRecordsOffset = 0;
constexpr int64_t kTailsOffset = 4096;
constexpr int64_t kHeadsOffset = kTailsOffset + int64_t(kMaxNvlRanks) * kMaxChannels * 8;
constexpr int64_t kExpertCountsOffset = 65536;
constexpr int kMaxLocalExperts = static_cast<int>((kNormalControlBytes - kExpertCountsOffset) / (2 * kMaxNvlRanks * 4));
static_assert(kHeadsOffset + int64_t(kMaxNvlRanks) * kMaxChannels * 8 <= kExpertCountsOffset);
static_assert(2 * kMaxNvlRanks * kCallRecordBytes <= kTailsOffset);

constexpr uint64_t kTailDoneBit = uint64_t(1) << 31;
constexpr uint32_t kCountMask = 0x7FFFFFFFu;

// What a rank announces at the start of a call (128 bytes).
struct CallRecord {
  uint64_t epoch;         // written last
  uint64_t signature;     // see call_signature(); equal on every rank of a well-formed call
  uint64_t geometry;      // see queue_signature(): the queues must be cut the same way everywhere
  uint64_t handle_epoch;  // cached dispatch / combine: epoch of the dispatch that made the handle
  int32_t num_tokens;
  int32_t num_worst_tokens;
  int32_t counts[kMaxNvlRanks];  // fresh dispatch: tokens this rank sends to each rank
  int32_t pad[14];
};
static_assert(sizeof(CallRecord) == kCallRecordBytes);

enum class CallKind : uint32_t { kDispatch = 1, kCachedDispatch = 2, kCombine = 3 };

// One 64-bit word naming the shape of a call, compared across ranks at the entry barrier:
//   kind 4 | fp8 1 | weights 1 | K 6 | payload bytes 26 | scales 26
EPCOMM_PROTOCOL_FN uint64_t call_signature(CallKind kind, bool fp8, bool weights, int num_topk, int64_t payload_bytes,
                                           int num_scales) {
  return uint64_t(kind) | uint64_t(fp8) << 4 | uint64_t(weights) << 5 | (uint64_t(num_topk) & 0x3F) << 6 |
         (uint64_t(payload_bytes) & 0x3FFFFFF) << 12 | (uint64_t(num_scales) & 0x3FFFFFF) << 38;
}

// The number of this rank's calls that the front rejected (SPEC §5: they were never launched), mod
// 4096, XORed into the top 12 bits of every signature, which no real scale count reaches: when one
// rank rejected a call its peers ran, its next call meets theirs with another signature, and every
// rank sees a mismatch instead of pairing two different calls' data.
constexpr int kRejectionsShift = 52;
EPCOMM_PROTOCOL_FN uint64_t with_rejections(uint64_t signature, uint64_t rejections) {
  return signature ^ ((rejections & 0xFFF) << kRejectionsShift);
}

// The queue geometry of a call (channels and ring size), compared across ranks like the signature.
EPCOMM_PROTOCOL_FN uint64_t queue_signature(int num_channels, int queue_tokens) {
  return uint64_t(uint32_t(num_channels)) | uint64_t(uint32_t(queue_tokens)) << 32;
}

EPCOMM_PROTOCOL_FN uint64_t pack_tail(uint64_t epoch, uint32_t count, bool done) {
  return epoch << 32 | (done ? kTailDoneBit : 0) | count;
}
EPCOMM_PROTOCOL_FN uint64_t pack_head(uint64_t epoch, uint32_t count) { return epoch << 32 | count; }
// The count of a counter if it belongs to call `epoch`, else 0 (it is from an earlier call).
EPCOMM_PROTOCOL_FN uint32_t count_of(uint64_t counter, uint64_t epoch) {
  return (counter >> 32) == (epoch & 0xFFFFFFFFull) ? static_cast<uint32_t>(counter & kCountMask) : 0u;
}
EPCOMM_PROTOCOL_FN bool done_of(uint64_t counter, uint64_t epoch) {
  return (counter >> 32) == (epoch & 0xFFFFFFFFull) && (counter & kTailDoneBit) != 0;
}

// The byte layout of one record.
struct RecordLayout {
  int32_t payload_bytes = 0;  // a multiple of 16
  int32_t num_scales = 0;
  int32_t num_topk = 0;

  EPCOMM_PROTOCOL_FN int64_t payload_offset() const { return 16; }
  EPCOMM_PROTOCOL_FN int64_t scales_offset() const { return 16 + int64_t(payload_bytes); }
  EPCOMM_PROTOCOL_FN int64_t idx_offset() const { return scales_offset() + (int64_t(num_scales) * 4 + 15) / 16 * 16; }
  EPCOMM_PROTOCOL_FN int64_t weights_offset() const { return idx_offset() + int64_t(num_topk) * 4; }
  EPCOMM_PROTOCOL_FN int64_t bytes() const { return (weights_offset() + int64_t(num_topk) * 4 + 15) / 16 * 16; }
};

// The queues of one call: C channels of Q slots per source rank.
struct QueueGeometry {
  int32_t num_channels = 1;  // C
  int32_t queue_tokens = 1;  // Q
  int64_t record_bytes = 16;

  EPCOMM_PROTOCOL_FN int64_t queue_offset(int source, int channel) const {
    return kNormalControlBytes + (int64_t(source) * num_channels + channel) * queue_tokens * record_bytes;
  }
  EPCOMM_PROTOCOL_FN int64_t bytes_needed(int num_ranks) const {
    return kNormalControlBytes + int64_t(num_ranks) * num_channels * queue_tokens * record_bytes;
  }
};

EPCOMM_PROTOCOL_FN int64_t call_record_offset(int parity, int source) {
  return kCallRecordsOffset + (int64_t(parity) * kMaxNvlRanks + source) * kCallRecordBytes;
}
EPCOMM_PROTOCOL_FN int64_t tail_offset(int source, int channel) {
  return kTailsOffset + (int64_t(source) * kMaxChannels + channel) * 8;
}
EPCOMM_PROTOCOL_FN int64_t head_offset(int receiver, int channel) {
  return kHeadsOffset + (int64_t(receiver) * kMaxChannels + channel) * 8;
}
EPCOMM_PROTOCOL_FN int64_t expert_counts_offset(int parity, int source) {
  return kExpertCountsOffset + (int64_t(parity) * kMaxNvlRanks + source) * kMaxLocalExperts * 4;
}

// Channel c covers tokens [begin, end) of a rank with T tokens, the same split on every rank and in
// every kernel of a call.
struct TokenRange {
  int32_t begin;
  int32_t end;
};
EPCOMM_PROTOCOL_FN TokenRange channel_tokens(int num_tokens, int num_channels, int channel) {
  return {static_cast<int32_t>(int64_t(num_tokens) * channel / num_channels),
          static_cast<int32_t>(int64_t(num_tokens) * (channel + 1) / num_channels)};
}

}  // namespace epcomm::cuda
