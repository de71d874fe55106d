// The shared-memory protocol of the CPU backend's low-latency mode (SPEC §4).
//
// Every low-latency call has a send half and a receive half. The send half only takes a private
// snapshot of its inputs and never touches shared memory; the receive half (run at once, or by the
// recv hook) does all the communication, always in the same four steps:
//
//   1. publish   write what peers need into this rank's own area (and a CallHeader)
//   2. sync      wait until every unmasked rank has published            ("step A")
//   3. move      read from / write to the peers' areas
//   4. sync      wait until every unmasked rank has finished moving      ("step B")
//
// Because every receive half ends with step B, the data of two calls are never in shared memory at
// the same time: calls may be issued in any order (d1 d2 c1 c2, hooks in between, ...) as long as
// every rank runs the receive halves in the same order. The CallHeader lets each rank check that
// its peers are running the same call with the same sizes.
//
// Fail-safe (SPEC §5). Every call (dispatch, combine, clean, and a call the front rejected) takes
// the next call id and goes through the four steps. Ranks at different call ids all raise
// kPeerFailure naming both calls (the Buffer is then failed); a rank whose inputs were rejected
// publishes a header with `rejected` set and its error's message right after it (in the control
// region), and moves nothing: its peers raise "rank r rejected its inputs" at the same call and the
// Buffer stays usable. Headers are read as untrusted: T and K are bound-checked before any use.
//
// How the area of each rank is used (offsets from LowLatencyLayout{T_max, hidden, R, E}, so that
// everything fits in get_low_latency_rdma_size_hint):
//   | region          | placed in                   | size                            | written by
//   |-----------------|-----------------------------|---------------------------------|--------------
//   | call header     | control                     | sizeof(CallHeader)              | owner, step 1
//   | dispatch tokens | dispatch receive, parity 0  | T_max x token_record_bytes      | owner, step 1
//   | combine routing | dispatch receive, parity 1  | T_max x 16 x int32 (topk_idx)   | owner, step 1
//   | combine tags    | right after combine routing | T_max x 16 x uint64 (call ids)  | peers, step 3
//   | combine rows    | combine receive, parity 0   | T_max x 16 x hidden x bf16      | peers, step 3
//   | zero-copy x     | combine send                | L x R*T_max x hidden x bf16     | the user only
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "cpu/cpu_context.hpp"

namespace epcomm::cpu {

enum class CallKind : int32_t { kDispatch = 1, kCombine = 2, kClean = 3 };

// The form of dispatch's recv_x (SPEC §4.1), or of the rows combine sends (kBf16, or kLogFmt with
// use_logfmt, SPEC §4.2); every rank of a call must ask for the same.
enum class RecvFormat : int32_t { kBf16 = 0, kFp8 = 1, kFp8RoundScale = 2, kFp8Ue8m0 = 3, kLogFmt = 4 };

// What a rank publishes about the call it is running; peers compare it with their own.
struct CallHeader {
  uint64_t call_id = 0;  // 1, 2, ... counted per rank by send halves: the same on every rank
  CallKind kind = CallKind::kDispatch;
  int32_t max_tokens_per_rank = 0;  // T_max
  int32_t hidden = 0;
  int32_t num_experts = 0;
  int32_t num_tokens = 0;                 // T of the publishing rank
  int32_t num_topk = 0;                   // K of the publishing rank
  RecvFormat format = RecvFormat::kBf16;  // dispatch: recv_x; combine: kBf16 or kLogFmt
  int32_t rejected = 0;                   // 0, or the ErrorCode of this rank's rejection of the call
  int32_t message_bytes = 0;              // its message, published right after the header
};

// What find_disagreement found: nothing (empty text), or an error to raise on this rank.
struct Disagreement {
  ErrorCode code = ErrorCode::kInvalidArgument;
  std::string text;
  bool empty() const { return text.empty(); }
};

// Offsets (bytes from the start of a rank's area) of the regions above for one (T_max, hidden, E).
struct Regions {
  int max_tokens_per_rank = 0;
  int hidden = 0;
  int num_local_experts = 0;
  int num_ranks = 0;

  int64_t header = 0;
  int64_t dispatch_tokens = 0;
  int64_t combine_routing = 0;
  int64_t combine_tags = 0;
  int64_t combine_rows = 0;
  int64_t end = 0;  // LowLatencyLayout::total_bytes()

  // The table above for these sizes. Throws kInternal if a region would not fit in its place of
  // LowLatencyLayout (a bug of this file, checked by the unit test over many sizes).
  static Regions for_sizes(int max_tokens_per_rank, int hidden, int num_ranks, int num_experts);

  // One published dispatch token: kMaxLowLatencyTopk int32 expert ids (-1 padded), then the bf16 row.
  int64_t token_record_bytes() const;
  // Combine slots: one per (token, top-k slot) of the receiving rank.
  int64_t num_combine_slots() const;
  int64_t combine_slot(int token, int slot) const;
  int64_t zero_copy_bytes() const;
};

// Nanoseconds a call spent waiting for each rank ([R]): the wait-cost stats of SPEC §4 count every
// wait of the call's receive half (both syncs), attributed to the rank waited for.
struct WaitTimes {
  std::vector<int64_t> ns;
  WaitTimes& operator+=(const WaitTimes& other) {
    for (size_t r = 0; r < ns.size(); ++r) ns[r] += other.ns[r];
    return *this;
  }
};

class LowLatencyExchange {
 public:
  LowLatencyExchange(const CpuContext& ctx, Area area);

  int rank() const { return ctx_.geometry.rank; }
  int num_ranks() const { return ctx_.geometry.num_ranks; }

  // The regions for these sizes. Throws kOutOfCapacity when the area is too small for them.
  Regions regions(int max_tokens_per_rank, int hidden, int num_experts, const char* op) const;
  std::byte* area_of(int rank) const { return area_.of(rank); }

  // The header lies at the start of every rank's area, whatever the sizes of the call.
  void publish_header(const CallHeader& header, std::string_view rejection = {});
  CallHeader header_of(int rank) const;
  // Empty when every unmasked rank published a header matching `mine` (same call id, kind and
  // sizes); else the first difference: kPeerFailure for other call ids or a header that cannot be
  // trusted, the rejection's code for a peer that rejected the call, else kInvalidArgument.
  Disagreement find_disagreement(const CallHeader& mine) const;

  // Publishes that this Buffer failed, so that peers waiting for this rank raise kPeerFailure.
  void mark_failed(const std::string& cause) noexcept { ctx_.sync->mark_failed(cause); }
  // The first cause of this Buffer's failure, or "" while it has not failed.
  std::string failure() const { return ctx_.sync->failure_of(rank()); }

  // Arrives at the next step of the low-latency channel and waits for every unmasked rank, in
  // ascending rank order; returns the time spent waiting for each rank (0 for ranks already
  // masked). A rank that does not arrive within the timeout makes it throw Error(kTimeout) naming
  // the operation and that rank; with enable_shrink the rank is masked instead (the time lost on it
  // is counted) and the wait goes on.
  WaitTimes sync(const char* op);

  // The mask of SPEC §6, local to this rank (1 = masked: skipped by waits, contributes nothing).
  bool masked(int rank) const { return mask_[rank] != 0; }
  void set_masked(int rank, bool masked) { mask_[rank] = masked ? 1 : 0; }
  void clear_mask();
  TensorView mask_view();

 private:
  CpuContext ctx_;
  Area area_;
  std::vector<int32_t> mask_;  // [R] int32, what query_mask returns
};

// topk_idx [T, K] (int32 or int64, contiguous) as int32; throws kInvalidArgument naming the first
// value outside [-1, num_experts).
std::vector<int32_t> checked_expert_ids(const TensorView& topk_idx, int num_experts, const char* op);

// Loads and stores of shared memory through memcpy: the area may start at any byte offset of the
// segment, so typed pointers into it could be misaligned.
template <class T>
T load_shared(const std::byte* from) {
  T value;
  std::memcpy(&value, from, sizeof(T));
  return value;
}
template <class T>
void store_shared(std::byte* to, const T& value) {
  std::memcpy(to, &value, sizeof(T));
}

}  // namespace epcomm::cpu
