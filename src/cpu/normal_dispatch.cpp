#include "cpu/normal_dispatch.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/check.hpp"
#include "core/semantics.hpp"
#include "cpu/normal_routing.hpp"

namespace epcomm::cpu {
namespace {

// Scales are 4-byte words, float32 or UE8M0-packed int32 (SPEC §1): moved as bits, never converted.
uint32_t* scale_at(const TensorView& scales, int64_t row, int s) {
  return scales.data_as<uint32_t>() + row * scales.stride(0) + s * scales.stride(1);
}

}  // namespace

void write_record(const TokenRecord& format, std::byte* record, const DispatchSend& send, int token) {
  const DispatchInputs& in = *send.inputs;
  std::memcpy(record, static_cast<const std::byte*>(in.x.data) + token * format.x_bytes, format.x_bytes);
  auto* scales = reinterpret_cast<uint32_t*>(record + format.scales_offset());
  for (int s = 0; s < format.num_scales; ++s) scales[s] = *scale_at(*in.x_scales, token, s);
  auto* topk = reinterpret_cast<int64_t*>(record + format.topk_offset());
  for (int k = 0; k < format.num_topk; ++k) topk[k] = topk_at(*in.topk_idx, token, k);
  if (format.has_weights)
    std::memcpy(record + format.weights_offset(),
                in.topk_weights->data_as<const float>() + int64_t(token) * format.num_topk,
                format.num_topk * sizeof(float));
  std::memcpy(record + format.flags_offset(), send.in_rank + int64_t(token) * format.num_ranks, format.num_ranks);
}

void read_record(const TokenRecord& format, const std::byte* record, DispatchReceive& out, int64_t row, int token) {
  std::memcpy(out.x + row * format.x_bytes, record, format.x_bytes);
  const auto* scales = reinterpret_cast<const uint32_t*>(record + format.scales_offset());
  for (int s = 0; s < format.num_scales; ++s) *scale_at(out.scales, row, s) = scales[s];
  const auto* topk = reinterpret_cast<const int64_t*>(record + format.topk_offset());
  const auto* weights = reinterpret_cast<const float*>(record + format.weights_offset());
  for (int k = 0; k < format.num_topk; ++k) {
    const int64_t local = semantics::local_expert(topk[k], out.rank, out.num_local_experts);
    out.topk_idx[row * format.num_topk + k] = local;
    if (out.topk_weights) out.topk_weights[row * format.num_topk + k] = semantics::local_weight(local, weights[k]);
  }
  out.src_idx[row] = token;
}

void clear_row(const TokenRecord& format, DispatchReceive& out, int64_t row) {
  std::memset(out.x + row * format.x_bytes, 0, format.x_bytes);
  for (int s = 0; s < format.num_scales; ++s) *scale_at(out.scales, row, s) = 0;
  for (int k = 0; k < format.num_topk; ++k) {
    out.topk_idx[row * format.num_topk + k] = -1;
    if (out.topk_weights) out.topk_weights[row * format.num_topk + k] = 0.0f;
  }
  out.src_idx[row] = -1;
}

void move_tokens(const Area& area, GroupSync& sync, int rank, const TokenRecord& record, const DispatchSend& send,
                 DispatchReceive& receive, const std::vector<int32_t>& num_tokens, const char* op) {
  const int num_ranks = static_cast<int>(num_tokens.size());
  const size_t record_bytes = record.bytes();
  const int window = static_cast<int>(std::min<size_t>(area.bytes / record_bytes, INT32_MAX));
  const int max_tokens = *std::max_element(num_tokens.begin(), num_tokens.end());
  const std::string step = concat(op, " (token rounds)");
  std::vector<int32_t> next_row = receive.first_row;
  std::string violation;  // the first sender that flagged more tokens for this rank than it announced

  for (int begin = 0; begin < max_tokens; begin += window) {
    std::byte* own = area.of(rank);
    for (int t = begin; t < std::min(send.num_tokens, begin + window); ++t)
      write_record(record, own + size_t(t - begin) * record_bytes, send, t);
    sync.barrier(kNormalChannel, step.c_str());
    for (int source = 0; source < num_ranks; ++source) {
      const std::byte* theirs = area.of(source);
      for (int t = begin; t < std::min(num_tokens[source], begin + window); ++t) {
        const std::byte* r = theirs + size_t(t - begin) * record_bytes;
        if (r[record.flags_offset() + rank] == std::byte{0}) continue;
        if (next_row[source] >= receive.end_row[source]) {
          if (violation.empty())
            violation = concat("rank ", source, " flagged more tokens for this rank (", rank, ") than the ",
                               receive.end_row[source] - receive.first_row[source], " it announced");
          continue;
        }
        read_record(record, r, receive, next_row[source]++, t);
      }
    }
    sync.barrier(kNormalChannel, step.c_str());
  }
  for (int source = 0; source < num_ranks && violation.empty(); ++source)
    if (next_row[source] != receive.end_row[source])
      violation =
          concat("rank ", source, " flagged ", next_row[source] - receive.first_row[source], " tokens for this rank (",
                 rank, ") but announced ", receive.end_row[source] - receive.first_row[source]);
  if (!violation.empty())
    throw_error(ErrorCode::kPeerFailure, concat(op, ": ", violation, " (a receiver never trusts its senders)"));
  const int num_real = num_ranks == 0 ? 0 : receive.end_row[num_ranks - 1];
  for (int row = num_real; row < receive.num_rows; ++row) clear_row(record, receive, row);
}

}  // namespace epcomm::cpu
