#include "cpu/normal_combine.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/check.hpp"
#include "core/layouts.hpp"
#include "core/numerics.hpp"
#include "core/semantics.hpp"
#include "cpu/normal_handle.hpp"

namespace epcomm::cpu {
namespace {

// Where, in a publishing rank's area, the rows it received from one source rank lie this round.
struct Slice {
  int32_t first_row = 0;  // row of recv_x of the first published row
  int32_t num_rows = 0;
  int64_t offset = 0;  // bytes from the start of the area
};

// The area during a combine round:
//   | Slice [R] (one per source rank) | rows: bf16 x [hidden], float32 topk_weights [K] |
struct RoundLayout {
  size_t table_bytes = 0;
  size_t row_bytes = 0;
  size_t x_bytes = 0;

  RoundLayout(int num_ranks, int hidden, int num_topk)
      : table_bytes(static_cast<size_t>(align_up(int64_t(num_ranks) * sizeof(Slice), 64))),
        row_bytes(static_cast<size_t>(align_up(int64_t(hidden) * 2 + int64_t(num_topk) * 4, 16))),
        x_bytes(size_t(hidden) * 2) {}
};

// Publishes, for every source rank, this rank's received rows whose source token is in [begin, end).
void publish_window(std::byte* own, const RoundLayout& layout, const CombineWork& work, int rank, int begin, int end) {
  const DispatchHandle& handle = *work.handle;
  const int32_t* src_idx = handle.recv_src_idx.data_as<const int32_t>();
  auto* slices = reinterpret_cast<Slice*>(own);
  int64_t offset = static_cast<int64_t>(layout.table_bytes);
  for (int source = 0; source < handle.num_ranks; ++source) {
    // Rows from one source are sorted by source token, so the window is one contiguous run.
    const int32_t* rows_begin = src_idx + first_row_from(handle, source, rank);
    const int32_t* rows_end = src_idx + first_row_from(handle, source + 1, rank);
    const int32_t first = static_cast<int32_t>(std::lower_bound(rows_begin, rows_end, begin) - src_idx);
    const int32_t last = static_cast<int32_t>(std::lower_bound(rows_begin, rows_end, end) - src_idx);
    slices[source] = Slice{first, last - first, offset};
    for (int32_t row = first; row < last; ++row, offset += layout.row_bytes) {
      std::memcpy(own + offset, work.x + int64_t(row) * work.hidden, layout.x_bytes);
      if (work.num_topk > 0)
        std::memcpy(own + offset + layout.x_bytes, work.topk_weights + int64_t(row) * work.num_topk,
                    work.num_topk * sizeof(float));
    }
  }
}

// The published row `row` of receiving rank r, or nullptr (and `violation` set) when r's slice table
// does not hold it inside r's area: a reader never trusts what a peer published.
const std::byte* published_row(const Area& area, const RoundLayout& layout, int r, int rank, int32_t row,
                               std::string& violation) {
  const std::byte* theirs = area.of(r);
  Slice slice;
  std::memcpy(&slice, theirs + size_t(rank) * sizeof(Slice), sizeof(Slice));
  const bool inside = slice.num_rows >= 0 && slice.offset >= int64_t(layout.table_bytes) &&
                      slice.offset <= int64_t(area.bytes) &&
                      int64_t(slice.num_rows) <= (int64_t(area.bytes) - slice.offset) / int64_t(layout.row_bytes) &&
                      row >= slice.first_row && int64_t(row) < int64_t(slice.first_row) + slice.num_rows;
  if (inside) return theirs + slice.offset + size_t(row - slice.first_row) * layout.row_bytes;
  if (violation.empty())
    violation = concat("rank ", r, " published rows [", slice.first_row, ", +", slice.num_rows, ") at byte ",
                       slice.offset, " for this rank (", rank, "), which do not hold its row ", row,
                       " inside its area (a receiver never trusts its senders)");
  return nullptr;
}

// Reduces this rank's tokens in [begin, end) from the rows the receiving ranks published, in the
// order of SPEC §3.3 (semantics::one_level_combine); `published` is scratch of R row pointers.
void reduce_window(const Area& area, const RoundLayout& layout, const CombineWork& work, int rank, int begin, int end,
                   std::vector<float>& acc, std::vector<float>& weight_acc, std::string& violation) {
  const DispatchHandle& handle = *work.handle;
  const int num_ranks = handle.num_ranks;
  const int32_t* send_row = handle.send_row.data_as<const int32_t>();
  std::vector<const std::byte*> published(num_ranks);
  for (int t = begin; t < end; ++t) {
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t row = send_row[int64_t(t) * num_ranks + r];
      published[r] = row < 0 ? nullptr : published_row(area, layout, r, rank, row, violation);
    }
    auto x_of = [&](int r) { return reinterpret_cast<const uint16_t*>(published[r]); };
    auto bias = [&](int b) { return work.bias[b] ? work.bias[b] + int64_t(t) * work.hidden : nullptr; };
    semantics::one_level_combine(acc, num_ranks, x_of, bias(0), bias(1), work.combined_x + int64_t(t) * work.hidden);
    if (!work.combined_weights) continue;
    std::fill(weight_acc.begin(), weight_acc.end(), 0.0f);
    for (int r = 0; r < num_ranks; ++r) {  // ascending receiving rank, like the rows
      if (published[r] == nullptr) continue;
      const auto* weights = reinterpret_cast<const float*>(published[r] + layout.x_bytes);
      for (int k = 0; k < work.num_topk; ++k) weight_acc[k] += weights[k];
    }
    std::copy(weight_acc.begin(), weight_acc.end(), work.combined_weights + int64_t(t) * work.num_topk);
  }
}

}  // namespace

size_t combine_min_bytes(int num_ranks, int hidden, int num_topk) {
  const RoundLayout layout(num_ranks, hidden, num_topk);
  return layout.table_bytes + size_t(num_ranks) * layout.row_bytes;
}

void combine_rows(const Area& area, GroupSync& sync, int rank, const CombineWork& work, const char* op) {
  const DispatchHandle& handle = *work.handle;
  const RoundLayout layout(handle.num_ranks, work.hidden, work.num_topk);
  // A window of W source tokens publishes at most W rows per source rank.
  const size_t window_bytes = size_t(handle.num_ranks) * layout.row_bytes;
  const int window = static_cast<int>(std::min<size_t>((area.bytes - layout.table_bytes) / window_bytes, INT32_MAX));
  const std::vector<int32_t>& num_tokens = handle_state(handle).num_tokens;
  const int max_tokens = *std::max_element(num_tokens.begin(), num_tokens.end());
  const std::string step = concat(op, " (token rounds)");
  std::vector<float> acc(work.hidden), weight_acc(work.num_topk);
  std::string violation;

  for (int begin = 0; begin < max_tokens; begin += window) {
    const int end = begin + std::min(window, max_tokens - begin);
    publish_window(area.of(rank), layout, work, rank, begin, end);
    sync.barrier(kNormalChannel, step.c_str());
    reduce_window(area, layout, work, rank, begin, std::min(end, handle.num_tokens), acc, weight_acc, violation);
    sync.barrier(kNormalChannel, step.c_str());
  }
  if (!violation.empty()) throw_error(ErrorCode::kPeerFailure, concat(op, ": ", violation));
}

}  // namespace epcomm::cpu
