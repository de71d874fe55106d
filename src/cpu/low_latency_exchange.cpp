#include "cpu/low_latency_exchange.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/check.hpp"
#include "core/layouts.hpp"

namespace epcomm::cpu {
namespace {

// Every step of low-latency mode goes through one channel: the calls are totally ordered anyway.
constexpr int kChannel = kLowLatencyFirstChannel;

// A broken invariant of this file's region table, not a user error.
void require_fits(bool fits, const char* region, const LowLatencyLayout& layout) {
  if (!fits)
    throw_error(ErrorCode::kInternal,
                concat("low-latency CPU regions: '", region,
                       "' does not fit in LowLatencyLayout{T_max = ", layout.max_tokens_per_rank,
                       ", hidden = ", layout.hidden, ", R = ", layout.num_ranks, ", E = ", layout.num_experts, "}"));
}

// Room for a rejection's message after the header, well inside kLowLatencyControlBytes.
constexpr int32_t kMaxMessageBytes = 2048;
static_assert(sizeof(CallHeader) + kMaxMessageBytes <= kLowLatencyControlBytes);

const char* name_of(CallKind kind) {
  switch (kind) {
    case CallKind::kDispatch:
      return "low_latency_dispatch";
    case CallKind::kCombine:
      return "low_latency_combine";
    case CallKind::kClean:
      return "clean_low_latency_buffer";
  }
  return "an unknown call";
}

ErrorCode rejection_code(int32_t code) {
  const auto c = static_cast<ErrorCode>(code);
  return c == ErrorCode::kOutOfCapacity || c == ErrorCode::kUnsupported ? c : ErrorCode::kInvalidArgument;
}

const char* name_of(RecvFormat format) {
  switch (format) {
    case RecvFormat::kBf16:
      return "bf16";
    case RecvFormat::kFp8:
      return "fp8";
    case RecvFormat::kFp8RoundScale:
      return "fp8 round_scale";
    case RecvFormat::kFp8Ue8m0:
      return "fp8 ue8m0";
    case RecvFormat::kLogFmt:
      return "use_logfmt";
  }
  return "?";
}

std::string describe(const CallHeader& h) {
  std::string text = concat("call #", h.call_id, " ", name_of(h.kind), "(T_max = ", h.max_tokens_per_rank,
                            ", hidden = ", h.hidden, ", num_experts = ", h.num_experts);
  if (h.kind == CallKind::kDispatch || h.format != RecvFormat::kBf16) text += concat(", ", name_of(h.format));
  return text + ")";
}

}  // namespace

std::vector<int32_t> checked_expert_ids(const TensorView& topk_idx, int num_experts, const char* op) {
  const int64_t count = topk_idx.numel();
  const int64_t num_topk = topk_idx.size(1);
  std::vector<int32_t> ids(count);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t value =
        topk_idx.dtype == DType::kInt64 ? topk_idx.data_as<int64_t>()[i] : topk_idx.data_as<int32_t>()[i];
    require(value >= -1 && value < num_experts, op, "topk_idx", "value ", value, " at [", i / num_topk, ", ",
            i % num_topk, "] is outside [-1, num_experts = ", num_experts, ")");
    ids[i] = static_cast<int32_t>(value);
  }
  return ids;
}

int64_t Regions::token_record_bytes() const {
  return align_up(int64_t(kMaxLowLatencyTopk) * 4 + int64_t(hidden) * 2, 16);
}

int64_t Regions::num_combine_slots() const { return int64_t(max_tokens_per_rank) * kMaxLowLatencyTopk; }

int64_t Regions::combine_slot(int token, int slot) const { return int64_t(token) * kMaxLowLatencyTopk + slot; }

int64_t Regions::zero_copy_bytes() const {
  return int64_t(num_local_experts) * num_ranks * max_tokens_per_rank * hidden * 2;
}

Regions Regions::for_sizes(int max_tokens_per_rank, int hidden, int num_ranks, int num_experts) {
  const LowLatencyLayout layout{max_tokens_per_rank, hidden, num_ranks, num_experts};
  Regions r;
  r.max_tokens_per_rank = max_tokens_per_rank;
  r.hidden = hidden;
  r.num_local_experts = layout.num_local_experts();
  r.num_ranks = num_ranks;
  r.header = 0;
  r.dispatch_tokens = layout.dispatch_recv_offset(0);
  r.combine_routing = layout.dispatch_recv_offset(1);
  r.combine_tags = r.combine_routing + r.num_combine_slots() * 4;
  r.combine_rows = layout.combine_recv_offset(0);
  r.end = layout.total_bytes();

  require_fits(sizeof(CallHeader) <= kLowLatencyControlBytes, "call header", layout);
  require_fits(r.dispatch_tokens + max_tokens_per_rank * r.token_record_bytes() <= layout.dispatch_meta_offset(0),
               "dispatch tokens", layout);
  require_fits(r.combine_tags + r.num_combine_slots() * 8 <= layout.dispatch_meta_offset(1), "combine routing and tags",
               layout);
  require_fits(r.combine_rows + r.num_combine_slots() * hidden * 2 <= layout.parity_offset(1), "combine rows", layout);
  return r;
}

LowLatencyExchange::LowLatencyExchange(const CpuContext& ctx, Area area)
    : ctx_(ctx), area_(area), mask_(ctx.geometry.num_ranks, 0) {}

Regions LowLatencyExchange::regions(int max_tokens_per_rank, int hidden, int num_experts, const char* op) const {
  const Regions r = Regions::for_sizes(max_tokens_per_rank, hidden, num_ranks(), num_experts);
  if (r.end > static_cast<int64_t>(area_.bytes))
    throw_error(ErrorCode::kOutOfCapacity,
                concat(op, ": num_rdma_bytes: the buffer has ", area_.bytes, " bytes but T_max = ", max_tokens_per_rank,
                       ", hidden = ", hidden, ", num_experts = ", num_experts, " needs ", r.end,
                       " (get_low_latency_rdma_size_hint)"));
  return r;
}

void LowLatencyExchange::publish_header(const CallHeader& header, std::string_view rejection) {
  std::byte* own = area_of(rank());
  CallHeader published = header;
  if (published.rejected != 0) {
    published.message_bytes = static_cast<int32_t>(std::min<size_t>(rejection.size(), kMaxMessageBytes));
    std::memcpy(own + sizeof(CallHeader), rejection.data(), size_t(published.message_bytes));
  }
  store_shared(own, published);
}

CallHeader LowLatencyExchange::header_of(int rank) const { return load_shared<CallHeader>(area_of(rank)); }

Disagreement LowLatencyExchange::find_disagreement(const CallHeader& mine) const {
  for (int peer = 0; peer < num_ranks(); ++peer) {
    if (masked(peer)) continue;
    const CallHeader theirs = header_of(peer);
    if (theirs.call_id != mine.call_id)
      return {ErrorCode::kPeerFailure,
              concat("call order: rank ", rank(), " runs low-latency call #", mine.call_id, " (", name_of(mine.kind),
                     ") but rank ", peer, " is at call #", theirs.call_id, " (", name_of(theirs.kind),
                     "): every rank must make the same low-latency calls, in the same order (receive hooks "
                     "included)")};
  }
  if (mine.rejected != 0) return {};  // this rank raises its own error
  for (int peer = 0; peer < num_ranks(); ++peer) {
    if (masked(peer)) continue;
    const CallHeader theirs = header_of(peer);
    if (theirs.rejected == 0) continue;
    if (theirs.message_bytes < 0 || theirs.message_bytes > kMaxMessageBytes)
      return {ErrorCode::kPeerFailure, concat("rank ", peer, " rejected this call with a message of ",
                                              theirs.message_bytes, " bytes, which this rank cannot trust")};
    const auto* text = reinterpret_cast<const char*>(area_of(peer) + sizeof(CallHeader));
    return {
        rejection_code(theirs.rejected),
        concat("rank ", peer, " rejected its inputs of this call: ", std::string(text, size_t(theirs.message_bytes)))};
  }
  for (int peer = 0; peer < num_ranks(); ++peer) {
    if (masked(peer)) continue;
    const CallHeader theirs = header_of(peer);
    const bool same_call = theirs.kind == mine.kind && theirs.max_tokens_per_rank == mine.max_tokens_per_rank &&
                           theirs.hidden == mine.hidden && theirs.num_experts == mine.num_experts &&
                           theirs.format == mine.format;
    // The sizes a reader relies on to stay inside the peer's regions.
    const bool sane = theirs.num_tokens >= 0 && theirs.num_tokens <= mine.max_tokens_per_rank && theirs.num_topk >= 0 &&
                      theirs.num_topk <= kMaxLowLatencyTopk;
    if (!same_call || !sane)
      return {same_call ? ErrorCode::kPeerFailure : ErrorCode::kInvalidArgument,
              concat("rank ", rank(), " runs ", describe(mine), " but rank ", peer, " published ", describe(theirs),
                     " with T = ", theirs.num_tokens, ", K = ", theirs.num_topk,
                     ": every rank must make the same low-latency calls, with the same sizes, in the same order "
                     "(receive hooks included)")};
  }
  return {};
}

WaitTimes LowLatencyExchange::sync(const char* op) {
  WaitTimes waited{std::vector<int64_t>(num_ranks(), 0)};
  const uint64_t sequence = ctx_.sync->arrive(kChannel);
  for (int peer = 0; peer < num_ranks(); ++peer) {
    if (masked(peer)) continue;
    const auto start = std::chrono::steady_clock::now();
    try {
      waited.ns[peer] = ctx_.sync->wait_for(peer, kChannel, sequence, op).count();
    } catch (const Error& error) {
      const bool lost = error.code() == ErrorCode::kTimeout || error.code() == ErrorCode::kPeerFailure;
      if (!lost || !ctx_.options->enable_shrink) throw;
      // SPEC §6: a rank that failed is masked and skipped instead of hanging us. The time lost
      // waiting for it still counts as time spent waiting for it.
      set_masked(peer, true);
      waited.ns[peer] = std::chrono::nanoseconds(std::chrono::steady_clock::now() - start).count();
    }
  }
  return waited;
}

void LowLatencyExchange::clear_mask() { std::fill(mask_.begin(), mask_.end(), 0); }

TensorView LowLatencyExchange::mask_view() {
  return TensorView::contiguous(mask_.data(), DType::kInt32, {int64_t(num_ranks())}, Device::cpu());
}

}  // namespace epcomm::cpu
