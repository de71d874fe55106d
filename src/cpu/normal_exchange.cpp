#include "cpu/normal_exchange.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/check.hpp"
#include "core/layouts.hpp"

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

CallKind call_kind_of(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kCachedDispatch:
      return CallKind::kCachedDispatch;
    case CollectiveKind::kCombine:
      return CallKind::kCombine;
    default:
      return CallKind::kDispatch;
  }
}

size_t exchange_bytes(size_t num_counts) { return sizeof(CallHeader) + num_counts * sizeof(int32_t); }

void check_area_fits(const Area& area, size_t needed, const char* op, const char* what) {
  if (needed <= area.bytes) return;
  throw_error(ErrorCode::kOutOfCapacity,
              concat(op, ": num_nvl_bytes: the normal-mode buffer has ", area.bytes, " bytes per rank but ", what,
                     " needs ", needed, " (Config::nvl_buffer_size_hint gives a size that always suffices)"));
}

namespace {

constexpr size_t kMaxMessageBytes = 2048;

// Reads rank r's entry without trusting it: every length and count is checked before it is used.
PeerCall read_entry(const Area& area, int r, int num_ranks) {
  PeerCall call;
  const std::byte* theirs = area.of(r);
  std::memcpy(&call.header, theirs, sizeof(CallHeader));
  const CallHeader& h = call.header;
  const size_t room = area.bytes - sizeof(CallHeader);  // the publisher checked that its header fits
  const auto* payload = theirs + sizeof(CallHeader);
  if (h.kind != CallKind::kDispatch && h.kind != CallKind::kCachedDispatch && h.kind != CallKind::kCombine) {
    call.malformed = concat("its call kind ", int32_t(h.kind), " is none of this protocol's");
  } else if (h.num_tokens < 0) {
    call.malformed = concat("T = ", h.num_tokens);
  } else if (h.rejected != 0) {
    if (h.message_bytes < 0 || size_t(h.message_bytes) > std::min(room, kMaxMessageBytes)) {
      call.malformed = concat("its rejection message has ", h.message_bytes, " bytes");
    } else {
      call.rejection.assign(reinterpret_cast<const char*>(payload), size_t(h.message_bytes));
    }
  } else if (h.kind == CallKind::kDispatch) {
    if (h.num_expert_counts < 0 || size_t(num_ranks) + size_t(h.num_expert_counts) > room / sizeof(int32_t)) {
      call.malformed = concat("it announces ", h.num_expert_counts, " per-expert counts");
      return call;
    }
    const auto* counts = reinterpret_cast<const int32_t*>(payload);
    call.counts.assign(counts, counts + num_ranks + h.num_expert_counts);
    const int64_t max_pairs = int64_t(h.num_tokens) * kMaxTopk;  // (token, slot) pairs per expert
    for (size_t i = 0; i < call.counts.size() && call.malformed.empty(); ++i) {
      const int64_t limit = i < size_t(num_ranks) ? h.num_tokens : max_pairs;
      if (call.counts[i] < 0 || call.counts[i] > limit)
        call.malformed = concat("its count ", i, " is ", call.counts[i], ", outside [0, ", limit, "]");
    }
  }
  return call;
}

}  // namespace

std::vector<PeerCall> exchange_calls(const Area& area, GroupSync& sync, int rank, const CallHeader& mine,
                                     std::span<const int32_t> counts, const char* op, std::string_view message) {
  check_area_fits(area, exchange_bytes(counts.size()), op, "the exchange of token counts");
  std::byte* own = area.of(rank);
  CallHeader header = mine;
  if (header.rejected != 0) {
    const size_t length = std::min({message.size(), area.bytes - sizeof(CallHeader), kMaxMessageBytes});
    header.message_bytes = static_cast<int32_t>(length);
    std::memcpy(own + sizeof(CallHeader), message.data(), length);
  } else if (!counts.empty()) {
    std::memcpy(own + sizeof(CallHeader), counts.data(), counts.size_bytes());
  }
  std::memcpy(own, &header, sizeof(CallHeader));

  const std::string step = concat(op, " (exchange of call shapes and counts)");
  sync.barrier(kNormalChannel, step.c_str());
  const int num_ranks = area.memory->num_ranks();
  std::vector<PeerCall> calls;
  for (int r = 0; r < num_ranks; ++r) calls.push_back(read_entry(area, r, num_ranks));
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

// The code a peer's rejection is raised with here: an input error's, whatever the entry claims.
ErrorCode rejection_code(int32_t code) {
  const auto c = static_cast<ErrorCode>(code);
  return c == ErrorCode::kOutOfCapacity || c == ErrorCode::kUnsupported ? c : ErrorCode::kInvalidArgument;
}

void check_call_numbers(const std::vector<PeerCall>& calls, int rank, const char* op) {
  const CallHeader& ours = calls[rank].header;
  bool differ = false;
  for (const PeerCall& call : calls) differ = differ || call.header.call_number != ours.call_number;
  if (differ) {
    std::string where;
    for (size_t r = 0; r < calls.size(); ++r)
      where += concat(r == 0 ? "" : ", ", "rank ", r, " at call #", calls[r].header.call_number, " (",
                      to_string(calls[r].header.kind), ")");
    throw_error(ErrorCode::kPeerFailure,
                concat(op, ": call order: the ranks are at different normal-mode calls of this Buffer: ", where,
                       " (this rank is ", rank, "): every rank must make the same calls in the same order"));
  }
  for (size_t r = 0; r < calls.size(); ++r)
    if (!calls[r].malformed.empty())
      throw_error(ErrorCode::kPeerFailure, concat(op, ": rank ", r, " published a call entry this rank (", rank,
                                                  ") cannot trust: ", calls[r].malformed));
}

}  // namespace

void check_same_call(const std::vector<PeerCall>& calls, int rank, const char* op) {
  check_call_numbers(calls, rank, op);
  const CallHeader& ours = calls[rank].header;
  if (ours.rejected != 0) return;  // this rank raises its own error
  for (size_t r = 0; r < calls.size(); ++r)
    if (calls[r].header.rejected != 0)
      throw_error(rejection_code(calls[r].header.rejected),
                  concat(op, ": rank ", r, " rejected its inputs of this call: ", calls[r].rejection));
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
