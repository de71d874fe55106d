#include "cpu/normal_exchange.hpp"

#include <cstring>
#include <string>

#include "core/check.hpp"

namespace epcomm::cpu {

const char* to_string(CallKind kind) {
  switch (kind) {
    case CallKind::kDispatch:
      return "dispatch";
    case CallKind::kCachedDispatch:
      return "cached dispatch";
    case CallKind::kCombine:
      return "combine";
  }
  return "an unknown call";
}

size_t exchange_bytes(size_t num_counts) { return sizeof(CallHeader) + num_counts * sizeof(int32_t); }

void check_area_fits(const Area& area, size_t needed, const char* op, const char* what) {
  if (needed <= area.bytes) return;
  throw_error(ErrorCode::kOutOfCapacity,
              concat(op, ": num_nvl_bytes: the normal-mode buffer has ", area.bytes, " bytes per rank but ", what,
                     " needs ", needed, " (Config::nvl_buffer_size_hint gives a size that always suffices)"));
}

std::vector<PeerCall> exchange_calls(const Area& area, GroupSync& sync, int rank, const CallHeader& mine,
                                     std::span<const int32_t> counts, const char* op) {
  check_area_fits(area, exchange_bytes(counts.size()), op, "the exchange of token counts");
  std::byte* own = area.of(rank);
  std::memcpy(own, &mine, sizeof(CallHeader));
  if (!counts.empty()) std::memcpy(own + sizeof(CallHeader), counts.data(), counts.size_bytes());

  const std::string step = concat(op, " (exchange of call shapes and counts)");
  sync.barrier(kNormalChannel, step.c_str());
  std::vector<PeerCall> calls(area.memory->num_ranks());
  for (int r = 0; r < static_cast<int>(calls.size()); ++r) {
    const std::byte* theirs = area.of(r);
    std::memcpy(&calls[r].header, theirs, sizeof(CallHeader));
    // The publisher checked that its own counts fit; its header says how many there are.
    const int32_t num_counts = calls[r].header.kind == CallKind::kDispatch
                                   ? static_cast<int32_t>(calls.size()) + calls[r].header.num_expert_counts
                                   : 0;
    const auto* counts_of_r = reinterpret_cast<const int32_t*>(theirs + sizeof(CallHeader));
    calls[r].counts.assign(counts_of_r, counts_of_r + num_counts);
  }
  sync.barrier(kNormalChannel, step.c_str());
  return calls;
}

namespace {

// One agreed field: `arg` is the argument the user should look at.
void check_field(int64_t ours, int64_t theirs, int their_rank, int rank, const char* op, const char* arg,
                 const char* field) {
  require(ours == theirs, op, arg, field, " = ", ours, " on this rank (", rank, ") but ", theirs, " on rank ",
          their_rank, ": every rank must pass the same");
}

}  // namespace

void check_same_call(const std::vector<PeerCall>& calls, int rank, const char* op) {
  const CallHeader& ours = calls[rank].header;
  const bool combine = ours.kind == CallKind::kCombine;
  for (int r = 0; r < static_cast<int>(calls.size()); ++r) {
    const CallHeader& theirs = calls[r].header;
    require(theirs.kind == ours.kind, op, "call order", "rank ", r, " is in ", to_string(theirs.kind),
            " while this rank (", rank, ") is in ", to_string(ours.kind),
            ": every rank must make the same normal-mode calls in the same order");
    check_field(ours.hidden, theirs.hidden, r, rank, op, "x", "hidden");
    if (theirs.x_dtype != ours.x_dtype)
      require(false, op, "x", "dtype ", to_string(DType(ours.x_dtype)), " on this rank (", rank, ") but ",
              to_string(DType(theirs.x_dtype)), " on rank ", r, ": every rank must pass the same");
    check_field(ours.num_scales, theirs.num_scales, r, rank, op, "x_scales", "S");
    check_field(ours.num_topk, theirs.num_topk, r, rank, op, combine ? "topk_weights" : "topk_idx",
                "K (0 = not given)");
    check_field(ours.has_weights, theirs.has_weights, r, rank, op, "topk_weights", "given (1) or not (0)");
    check_field(ours.num_experts, theirs.num_experts, r, rank, op, "num_experts", "E (0 = unknown)");
    check_field(ours.num_expert_counts, theirs.num_expert_counts, r, rank, op, "num_tokens_per_expert",
                "per-expert counts known (E) or not (0)");
    require(ours.handle_step == theirs.handle_step, op, "handle", "this rank's (", rank, ") handle and rank ", r,
            "'s come from different dispatch calls: every rank must pass the handle of the same dispatch");
  }
}

}  // namespace epcomm::cpu
