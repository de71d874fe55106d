#include "cpu/low_latency_dispatch.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "core/allocate.hpp"
#include "core/check.hpp"
#include "core/layouts.hpp"
#include "core/numerics.hpp"
#include "core/semantics.hpp"

namespace epcomm::cpu {
namespace {

constexpr const char* kOp = "low_latency_dispatch";

RecvFormat format_of(const LowLatencyDispatchInputs& in) {
  if (!in.use_fp8) return RecvFormat::kBf16;
  if (in.use_ue8m0) return RecvFormat::kFp8Ue8m0;
  return in.round_scale ? RecvFormat::kFp8RoundScale : RecvFormat::kFp8;
}

bool names_expert(const std::byte* record, int num_topk, int expert) {
  return semantics::token_selects_expert([&](int k) { return int64_t(load_shared<int32_t>(record + 4 * k)); }, num_topk,
                                         expert);
}

}  // namespace

LowLatencyDispatchCall::LowLatencyDispatchCall(const LowLatencyDispatchArgs& args, const LowLatencyOptions& options,
                                               uint64_t call_id, const GroupGeometry& geometry)
    : call_id_(call_id),
      rank_(geometry.rank),
      num_ranks_(geometry.num_ranks),
      num_tokens_(args.num_tokens),
      hidden_(args.hidden),
      num_topk_(args.num_topk),
      num_experts_(args.num_experts),
      num_local_experts_(args.num_local_experts),
      max_tokens_per_rank_(args.max_tokens_per_rank),
      format_(format_of(*args.inputs)),
      recv_stats_(args.inputs->cumulative_local_expert_recv_stats),
      wait_stats_(args.inputs->dispatch_wait_recv_cost_stats) {
  const LowLatencyDispatchInputs& in = *args.inputs;
  topk_idx_ = checked_expert_ids(in.topk_idx, num_experts_, kOp);
  const auto* x = in.x.data_as<const uint16_t>();
  x_.assign(x, x + int64_t(num_tokens_) * hidden_);

  const int64_t L = num_local_experts_, rows = int64_t(num_ranks_) * max_tokens_per_rank_;
  const bool fp8 = format_ != RecvFormat::kBf16;
  Allocator& allocator = *args.allocator;
  const Device cpu = Device::cpu();
  recv_x_ = allocate(allocator, fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, {L, rows, hidden_}, cpu, options.stream);
  if (format_ == RecvFormat::kFp8Ue8m0) {
    recv_scales_ =
        allocate_column_major(allocator, DType::kInt32, {L, rows, hidden_ / (4 * kFp8GroupSize)}, cpu, options.stream);
  } else if (fp8) {
    recv_scales_ =
        allocate_column_major(allocator, DType::kFloat32, {L, rows, hidden_ / kFp8GroupSize}, cpu, options.stream);
  }
  recv_count_ = allocate(allocator, DType::kInt32, {L}, cpu, options.stream);
  src_info_ = allocate(allocator, DType::kInt32, {L, rows}, cpu, options.stream);
  layout_range_ = allocate(allocator, DType::kInt64, {L, num_ranks_}, cpu, options.stream);
}

LowLatencyDispatchResult LowLatencyDispatchCall::result() const {
  LowLatencyDispatchResult result;
  result.recv_x = recv_x_;
  if (format_ != RecvFormat::kBf16) result.recv_x_scales = recv_scales_;
  result.recv_count = recv_count_;
  result.handle.src_info = src_info_;
  result.handle.layout_range = layout_range_;
  result.handle.num_max_dispatch_tokens_per_rank = max_tokens_per_rank_;
  result.handle.hidden = hidden_;
  result.handle.num_experts = num_experts_;
  return result;
}

CallHeader LowLatencyDispatchCall::header() const {
  CallHeader h;
  h.call_id = call_id_;
  h.kind = CallKind::kDispatch;
  h.max_tokens_per_rank = max_tokens_per_rank_;
  h.hidden = hidden_;
  h.num_experts = num_experts_;
  h.num_tokens = num_tokens_;
  h.num_topk = num_topk_;
  h.format = format_;
  return h;
}

void LowLatencyDispatchCall::receive(LowLatencyExchange& exchange) {
  const Regions regions = exchange.regions(max_tokens_per_rank_, hidden_, num_experts_, kOp);
  publish_tokens(exchange, regions);
  exchange.publish_header(header());
  WaitTimes waited = exchange.sync(kOp);  // every rank's tokens are published
  const Disagreement disagreement = exchange.find_disagreement(header());
  if (disagreement.empty()) gather_tokens(exchange, regions);
  waited += exchange.sync(kOp);  // nobody reads our tokens any more: the next call may overwrite them
  if (!disagreement.empty()) throw_error(disagreement.code, concat(kOp, ": ", disagreement.text));
  add_stats(waited);
}

// Token t goes to record t of our dispatch-tokens region: its K expert ids (-1 padded to 16), then
// its bf16 row. Peers pick what they need; a token is read once per local expert it names.
void LowLatencyDispatchCall::publish_tokens(LowLatencyExchange& exchange, const Regions& regions) const {
  std::byte* records = exchange.area_of(rank_) + regions.dispatch_tokens;
  for (int t = 0; t < num_tokens_; ++t) {
    std::byte* record = records + t * regions.token_record_bytes();
    std::array<int32_t, kMaxLowLatencyTopk> ids;
    ids.fill(-1);
    std::memcpy(ids.data(), &topk_idx_[int64_t(t) * num_topk_], sizeof(int32_t) * num_topk_);
    std::memcpy(record, ids.data(), sizeof(ids));
    std::memcpy(record + sizeof(ids), &x_[int64_t(t) * hidden_], sizeof(uint16_t) * hidden_);
  }
}

// SPEC §4.1's order: per local expert, source rank ascending, then source token ascending; a token
// that names the expert in several slots comes once. Masked ranks contribute no rows.
void LowLatencyDispatchCall::gather_tokens(const LowLatencyExchange& exchange, const Regions& regions) {
  auto* recv_count = recv_count_.data_as<int32_t>();
  auto* src_info = src_info_.data_as<int32_t>();
  auto* layout_range = layout_range_.data_as<int64_t>();
  const int64_t rows_per_expert = int64_t(num_ranks_) * max_tokens_per_rank_;
  std::vector<uint16_t> token(hidden_);
  for (int l = 0; l < num_local_experts_; ++l) {
    const int expert = rank_ * num_local_experts_ + l;
    int row = 0;
    for (int source = 0; source < num_ranks_; ++source) {
      const int begin = row;
      if (!exchange.masked(source)) {
        // Checked by find_disagreement; clamped again since a reader never trusts a peer's memory.
        const CallHeader peer = exchange.header_of(source);
        const int num_tokens = std::clamp(peer.num_tokens, 0, max_tokens_per_rank_);
        const int num_topk = std::clamp(peer.num_topk, 0, kMaxLowLatencyTopk);
        const std::byte* records = exchange.area_of(source) + regions.dispatch_tokens;
        for (int t = 0; t < num_tokens; ++t) {
          const std::byte* record = records + t * regions.token_record_bytes();
          if (!names_expert(record, num_topk, expert)) continue;
          std::memcpy(token.data(), record + 4 * kMaxLowLatencyTopk, sizeof(uint16_t) * hidden_);
          store_row(l, row, token.data());
          src_info[l * rows_per_expert + row] = t;
          ++row;
        }
      }
      layout_range[l * num_ranks_ + source] = semantics::pack_layout_range(begin, row - begin);
    }
    recv_count[l] = row;
  }
}

// Row `row` of local expert l in recv_x: the bf16 token as is, or its FP8 cast (SPEC §4.1): per
// block of 128 channels, amax = max |x| (floored in fp8_scale), s = scale, value = e4m3(x / s).
void LowLatencyDispatchCall::store_row(int local_expert, int row, const uint16_t* token) {
  const int64_t rows = int64_t(num_ranks_) * max_tokens_per_rank_;
  const int64_t row_index = local_expert * rows + row;
  if (format_ == RecvFormat::kBf16) {
    std::memcpy(recv_x_.data_as<uint16_t>() + row_index * hidden_, token, sizeof(uint16_t) * hidden_);
    return;
  }
  const bool round_scale = format_ != RecvFormat::kFp8;
  const int num_groups = hidden_ / kFp8GroupSize;
  uint8_t* out = recv_x_.data_as<uint8_t>() + row_index * hidden_;
  uint32_t packed = 0;  // ue8m0: four exponent bytes, group 4j+i in byte i (little-endian)
  for (int g = 0; g < num_groups; ++g) {
    const uint16_t* block = token + g * kFp8GroupSize;
    const float scale = semantics::fp8_block_scale(block, kFp8GroupSize, round_scale);
    for (int i = 0; i < kFp8GroupSize; ++i)
      out[g * kFp8GroupSize + i] = numerics::fp8_quantize(numerics::bf16_to_float(block[i]), scale);
    if (format_ == RecvFormat::kFp8Ue8m0) {
      packed |= uint32_t(numerics::ue8m0_byte(scale)) << (8 * (g % 4));
      if (g % 4 == 3) {
        recv_scales_.data_as<int32_t>()[(local_expert * int64_t(num_groups / 4) + g / 4) * rows + row] =
            static_cast<int32_t>(packed);
        packed = 0;
      }
    } else {
      recv_scales_.data_as<float>()[(local_expert * int64_t(num_groups) + g) * rows + row] = scale;
    }
  }
}

void LowLatencyDispatchCall::add_stats(const WaitTimes& waited) const {
  if (recv_stats_)
    for (int l = 0; l < num_local_experts_; ++l)
      recv_stats_->data_as<int32_t>()[l] += recv_count_.data_as<int32_t>()[l];
  if (wait_stats_)
    for (int r = 0; r < num_ranks_; ++r) wait_stats_->data_as<int64_t>()[r] += waited.ns[r];
}

}  // namespace epcomm::cpu
