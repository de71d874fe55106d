#include "cpu/low_latency_combine.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/allocate.hpp"
#include "core/check.hpp"
#include "core/layouts.hpp"
#include "core/logfmt.hpp"
#include "core/numerics.hpp"
#include "core/semantics.hpp"

namespace epcomm::cpu {
namespace {

constexpr const char* kOp = "low_latency_combine";

}  // namespace

LowLatencyCombineCall::LowLatencyCombineCall(const LowLatencyCombineArgs& args, const LowLatencyOptions& options,
                                             uint64_t call_id, const GroupGeometry& geometry,
                                             const std::byte* zero_copy_x)
    : call_id_(call_id),
      rank_(geometry.rank),
      num_ranks_(geometry.num_ranks),
      num_tokens_(args.num_tokens),
      hidden_(args.hidden),
      num_topk_(args.num_topk),
      num_experts_(args.num_experts),
      num_local_experts_(args.num_local_experts),
      max_tokens_per_rank_(args.max_tokens_per_rank),
      use_logfmt_(args.inputs->use_logfmt),
      wait_stats_(args.inputs->combine_wait_recv_cost_stats) {
  const LowLatencyCombineInputs& in = *args.inputs;
  topk_idx_ = checked_expert_ids(in.topk_idx, num_experts_, kOp);
  const float* weights = in.topk_weights.data_as<const float>();
  topk_weights_.assign(weights, weights + int64_t(num_tokens_) * num_topk_);
  snapshot_rows(*in.handle, zero_copy_x != nullptr ? zero_copy_x : static_cast<const std::byte*>(in.x.data));
  if (in.out) {
    out_ = Tensor::borrowed(*in.out);
  } else {
    out_ = allocate(*args.allocator, DType::kBFloat16, {num_tokens_, hidden_}, Device::cpu(), options.stream);
  }
}

// The valid rows are the ones layout_range names: [begin, begin + count) of each (expert, source).
// The handle is checked here so that nothing later reads or writes outside a region.
void LowLatencyCombineCall::snapshot_rows(const LowLatencyHandle& handle, const std::byte* x) {
  const int64_t rows_per_expert = int64_t(num_ranks_) * max_tokens_per_rank_;
  const auto* layout_range = handle.layout_range.data_as<const int64_t>();
  const auto* src_info = handle.src_info.data_as<const int32_t>();
  for (int l = 0; l < num_local_experts_; ++l) {
    for (int source = 0; source < num_ranks_; ++source) {
      const int64_t packed = layout_range[l * num_ranks_ + source];
      const int64_t begin = semantics::layout_range_begin(packed), count = semantics::layout_range_count(packed);
      require(begin >= 0 && begin + count <= rows_per_expert, kOp, "handle.layout_range", "[", l, ", ", source,
              "] = (begin ", begin, ", count ", count, ") exceeds R * T_max = ", rows_per_expert, " rows");
      for (int64_t row = begin; row < begin + count; ++row) {
        const int32_t token = src_info[l * rows_per_expert + row];
        require(token >= 0 && token < max_tokens_per_rank_, kOp, "handle.src_info", "[", l, ", ", row, "] = ", token,
                " is not a token index below T_max = ", max_tokens_per_rank_);
        rows_.push_back({l, source, token});
        const std::byte* data = x + (l * rows_per_expert + row) * hidden_ * int64_t(sizeof(uint16_t));
        const size_t offset = row_data_.size();
        row_data_.resize(offset + hidden_);
        std::memcpy(&row_data_[offset], data, sizeof(uint16_t) * hidden_);
      }
    }
  }
}

LowLatencyCombineResult LowLatencyCombineCall::result() const {
  LowLatencyCombineResult result;
  result.combined_x = out_;
  return result;
}

CallHeader LowLatencyCombineCall::header() const {
  CallHeader h;
  h.call_id = call_id_;
  h.kind = CallKind::kCombine;
  h.max_tokens_per_rank = max_tokens_per_rank_;
  h.hidden = hidden_;
  h.num_experts = num_experts_;
  h.num_tokens = num_tokens_;
  h.num_topk = num_topk_;
  h.format = use_logfmt_ ? RecvFormat::kLogFmt : RecvFormat::kBf16;  // peers must agree on the wire format
  return h;
}

void LowLatencyCombineCall::receive(LowLatencyExchange& exchange) {
  const Regions regions = exchange.regions(max_tokens_per_rank_, hidden_, num_experts_, kOp);
  publish_routing(exchange, regions);
  exchange.publish_header(header());
  WaitTimes waited = exchange.sync(kOp);  // every rank's routing is published
  const Disagreement disagreement = exchange.find_disagreement(header());
  if (disagreement.empty()) send_rows(exchange, regions);
  waited += exchange.sync(kOp);  // every row sent to us has arrived
  if (!disagreement.empty()) throw_error(disagreement.code, concat(kOp, ": ", disagreement.text));
  check_every_slot_arrived(exchange, regions);
  reduce(exchange, regions);
  if (wait_stats_)
    for (int r = 0; r < num_ranks_; ++r) wait_stats_->data_as<int64_t>()[r] += waited.ns[r];
}

// Our topk_idx, so that an expert's rank knows which slots of a token name it, and our slot tags
// reset: a tag equal to this call's id then proves that the slot was filled by this call.
void LowLatencyCombineCall::publish_routing(LowLatencyExchange& exchange, const Regions& regions) const {
  std::byte* area = exchange.area_of(rank_);
  for (int t = 0; t < num_tokens_; ++t) {
    for (int k = 0; k < num_topk_; ++k) {
      const int64_t slot = regions.combine_slot(t, k);
      store_shared(area + regions.combine_routing + 4 * slot, topk_idx_[int64_t(t) * num_topk_ + k]);
      store_shared(area + regions.combine_tags + 8 * slot, uint64_t(0));
    }
  }
}

// Each valid row goes to its token's rank, into every slot of that token that names the row's
// expert (a token naming an expert twice gets the row twice), tagged with the call id.
void LowLatencyCombineCall::send_rows(LowLatencyExchange& exchange, const Regions& regions) const {
  std::vector<CallHeader> peers(num_ranks_);  // masked ranks' headers are neither read nor used
  for (int r = 0; r < num_ranks_; ++r)
    if (!exchange.masked(r)) {
      // Checked by find_disagreement; clamped again since a writer never trusts a peer's memory.
      peers[r] = exchange.header_of(r);
      peers[r].num_tokens = std::clamp(peers[r].num_tokens, 0, max_tokens_per_rank_);
      peers[r].num_topk = std::clamp(peers[r].num_topk, 0, kMaxLowLatencyTopk);
    }
  const int64_t slot_bytes = int64_t(sizeof(uint16_t)) * hidden_;  // a slot holds a bf16 row; LogFMT rows are shorter
  std::vector<uint8_t> scratch;
  for (size_t i = 0; i < rows_.size(); ++i) {
    const ExpertRow& row = rows_[i];
    if (exchange.masked(row.src_rank)) continue;
    const CallHeader& peer = peers[row.src_rank];
    // A token the rank does not have: the rank will find its slots empty if it expected this row.
    if (row.src_token >= peer.num_tokens) continue;
    std::byte* area = exchange.area_of(row.src_rank);
    const int expert = rank_ * num_local_experts_ + row.local_expert;
    const std::byte* data = wire_row(i, scratch);
    for (int k = 0; k < peer.num_topk; ++k) {
      const int64_t slot = regions.combine_slot(row.src_token, k);
      if (load_shared<int32_t>(area + regions.combine_routing + 4 * slot) != expert) continue;
      std::memcpy(area + regions.combine_rows + slot * slot_bytes, data, wire_row_bytes());
      store_shared(area + regions.combine_tags + 8 * slot, call_id_);
    }
  }
}

// A slot contributes when it names an expert whose rank is not masked. SPEC §6 with enable_shrink:
// an expert on a masked rank contributes nothing, exactly as if its slot were -1.
bool LowLatencyCombineCall::contributes(const LowLatencyExchange& exchange, int token, int slot) const {
  const int32_t expert = topk_idx_[int64_t(token) * num_topk_ + slot];
  return expert != -1 && !exchange.masked(expert / num_local_experts_);
}

void LowLatencyCombineCall::check_every_slot_arrived(const LowLatencyExchange& exchange, const Regions& regions) const {
  const std::byte* area = exchange.area_of(rank_);
  for (int t = 0; t < num_tokens_; ++t) {
    for (int k = 0; k < num_topk_; ++k) {
      if (!contributes(exchange, t, k)) continue;
      if (load_shared<uint64_t>(area + regions.combine_tags + 8 * regions.combine_slot(t, k)) == call_id_) continue;
      const int32_t expert = topk_idx_[int64_t(t) * num_topk_ + k];
      throw_error(ErrorCode::kInvalidArgument,
                  concat(kOp, ": topk_idx: [", t, ", ", k, "] names expert ", expert, " but rank ",
                         expert / num_local_experts_, " has no row of token ", t, " for it in its handle: combine ",
                         "needs the topk_idx given to the dispatch that made the handle"));
    }
  }
}

int64_t LowLatencyCombineCall::wire_row_bytes() const {
  return use_logfmt_ ? logfmt::row_bytes(hidden_) : int64_t(sizeof(uint16_t)) * hidden_;
}

const std::byte* LowLatencyCombineCall::wire_row(size_t i, std::vector<uint8_t>& scratch) const {
  const uint16_t* values = &row_data_[i * hidden_];
  if (!use_logfmt_) return reinterpret_cast<const std::byte*>(values);
  scratch.resize(logfmt::row_bytes(hidden_));
  logfmt::encode_row(values, hidden_, scratch.data());
  return reinterpret_cast<const std::byte*>(scratch.data());
}

void LowLatencyCombineCall::read_wire_row(const std::byte* from, std::vector<uint16_t>& row) const {
  if (!use_logfmt_) {
    std::memcpy(row.data(), from, sizeof(uint16_t) * hidden_);
    return;
  }
  std::vector<uint8_t> encoded(logfmt::row_bytes(hidden_));  // the area may be unaligned: copy first
  std::memcpy(encoded.data(), from, encoded.size());
  logfmt::decode_row(encoded.data(), hidden_, row.data());
}

// SPEC §4.2 with the lead's rule: acc = 0.0f; for k ascending: acc = fmaf(w[t,k], row(t,k), acc);
// out[t] = bf16_rn(acc). fmaf is the fused multiply-add on both CPU and GPU.
void LowLatencyCombineCall::reduce(const LowLatencyExchange& exchange, const Regions& regions) {
  const std::byte* area = exchange.area_of(rank_);
  std::vector<float> acc(hidden_);
  std::vector<uint16_t> row(hidden_);
  auto* out = out_.data_as<uint16_t>();
  for (int t = 0; t < num_tokens_; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int k = 0; k < num_topk_; ++k) {
      if (!contributes(exchange, t, k)) continue;
      const float weight = topk_weights_[int64_t(t) * num_topk_ + k];
      read_wire_row(area + regions.combine_rows + regions.combine_slot(t, k) * hidden_ * 2, row);
      semantics::add_weighted_bf16_row(acc, weight, row.data());
    }
    semantics::round_to_bf16(acc, out + int64_t(t) * hidden_);
  }
}

}  // namespace epcomm::cpu
