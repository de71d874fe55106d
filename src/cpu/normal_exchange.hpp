// The first step of every normal-mode call on the CPU backend: each rank publishes what it was asked
// to do (a CallHeader and, for a fresh dispatch, its token counts) in its own area; after a barrier
// every rank reads every rank's entry; a second barrier frees the areas for the next step.
//
// Because every rank then holds the same picture, any error found in it (ranks making different
// calls, shapes that differ, a receiver over its num_worst_tokens) is raised by every rank at the
// same step: the buffer stays usable. An error found before the exchange on one rank only (a front
// check, bad index values, inconsistent layout tensors) still takes part in the exchange, as a
// "rejected" entry carrying the error's code and message: its peers raise "rank r rejected its
// inputs: ..." at the same call. Every entry carries the Buffer's normal-mode call number; ranks at
// different numbers fail with kPeerFailure naming every rank's number and kind (the Buffer is then
// failed). Entries are read as untrusted: counts and lengths are bound-checked before use.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cpu/cpu_context.hpp"

namespace epcomm::cpu {

enum class CallKind : int32_t { kDispatch = 1, kCachedDispatch = 2, kCombine = 3 };
const char* to_string(CallKind kind);
CallKind call_kind_of(CollectiveKind kind);

// Fields that must be equal on every rank are marked "agreed".
struct CallHeader {
  uint64_t call_number = 0;       // agreed: 1, 2, ... per Buffer, every normal-mode call (rejected ones too)
  int32_t rejected = 0;           // 0, or the ErrorCode of this rank's rejection; its message follows
  int32_t message_bytes = 0;      // length of that message
  CallKind kind{};                // agreed
  int32_t num_tokens = 0;         // T of the publishing rank
  int32_t hidden = 0;             // agreed
  int32_t x_dtype = 0;            // agreed: DType of x
  int32_t num_scales = 0;         // agreed: S, 0 without scales
  int32_t num_topk = 0;           // agreed: K of topk_idx (dispatch) or topk_weights (combine), 0 = none
  int32_t has_weights = 0;        // agreed: dispatch got topk_weights
  int32_t num_experts = 0;        // agreed: E, 0 = unknown
  int32_t num_expert_counts = 0;  // agreed: E when per-expert counts follow, else 0
  int32_t num_worst_tokens = 0;   // of the publishing rank
  uint64_t handle_step = 0;       // agreed: cached dispatch / combine: which dispatch made the handle
};

struct PeerCall {
  CallHeader header;
  std::vector<int32_t> counts;  // a fresh dispatch: tokens per destination rank [R], then per expert [E]
  std::string rejection;        // the message of a rejected entry
  std::string malformed;        // why the entry cannot be trusted, "" when it can
};

// Bytes the exchange needs in each rank's area.
size_t exchange_bytes(size_t num_counts);

// Collective (two barriers on kNormalChannel). Returns every rank's call, indexed by rank. `message`
// is published after the header of a rejected entry (truncated to fit).
// Throws Error(kOutOfCapacity) before communicating when the area cannot hold this rank's entry.
std::vector<PeerCall> exchange_calls(const Area& area, GroupSync& sync, int rank, const CallHeader& mine,
                                     std::span<const int32_t> counts, const char* op, std::string_view message = {});

// Throws Error(kPeerFailure) on every rank when the ranks are at different call numbers or an entry
// is malformed. Then, unless this rank rejected the call itself, throws the first peer's rejection
// (with its code), or Error(kInvalidArgument) when some rank's agreed fields differ from ours.
void check_same_call(const std::vector<PeerCall>& calls, int rank, const char* op);

// Throws Error(kOutOfCapacity) stating the bytes needed when `needed` exceeds the area.
void check_area_fits(const Area& area, size_t needed, const char* op, const char* what);

}  // namespace epcomm::cpu
