// The first step of every normal-mode call on the CPU backend: each rank publishes what it was asked
// to do (a CallHeader and, for a fresh dispatch, its token counts) in its own area; after a barrier
// every rank reads every rank's entry; a second barrier frees the areas for the next step.
//
// Because every rank then holds the same picture, any error found in it (ranks making different
// calls, shapes that differ, a receiver over its num_worst_tokens) is raised by every rank at the
// same step: the buffer stays usable. Errors found before the exchange (bad index values, inconsistent
// layout tensors) are known to one rank only; it raises at once and its peers time out naming it.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "cpu/cpu_context.hpp"

namespace epcomm::cpu {

enum class CallKind : int32_t { kDispatch = 1, kCachedDispatch = 2, kCombine = 3 };
const char* to_string(CallKind kind);

// Fields that must be equal on every rank are marked "agreed".
struct CallHeader {
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
};

// Bytes the exchange needs in each rank's area.
size_t exchange_bytes(size_t num_counts);

// Collective (two barriers on kNormalChannel). Returns every rank's call, indexed by rank.
// Throws Error(kOutOfCapacity) before communicating when the area cannot hold this rank's entry.
std::vector<PeerCall> exchange_calls(const Area& area, GroupSync& sync, int rank, const CallHeader& mine,
                                     std::span<const int32_t> counts, const char* op);

// Throws Error(kInvalidArgument) on every rank when some rank's agreed fields differ from ours.
void check_same_call(const std::vector<PeerCall>& calls, int rank, const char* op);

// Throws Error(kOutOfCapacity) stating the bytes needed when `needed` exceeds the area.
void check_area_fits(const Area& area, size_t needed, const char* op, const char* what);

}  // namespace epcomm::cpu
