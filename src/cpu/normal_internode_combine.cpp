#include "cpu/normal_internode_combine.hpp"

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

constexpr size_t kTokenBytes = 16;  // the token index of a published row, padded

struct Slice {
  int32_t num_rows = 0;
  int64_t offset = 0;  // bytes from the start of the area
};

// Offsets of one round's regions; see the header.
struct RoundLayout {
  int num_nodes = 0;
  size_t x_bytes = 0;          // bf16 [hidden]
  size_t weight_bytes = 0;     // float32 [K]
  size_t table_bytes = 0;      // Slice [R]
  size_t published_bytes = 0;  // token index + x + weights, padded
  size_t partial_bytes = 0;    // x + weights, padded
  size_t entry_bytes = 0;      // token index + partial
  int window = 0;              // W
  size_t slot_bytes = 0;
  size_t inbox_offset = 0;

  RoundLayout(int num_ranks, int nodes, int hidden, int num_topk, size_t area_bytes)
      : num_nodes(nodes),
        x_bytes(size_t(hidden) * 2),
        weight_bytes(size_t(num_topk) * sizeof(float)),
        table_bytes(static_cast<size_t>(align_up(int64_t(num_ranks) * sizeof(Slice), 64))),
        published_bytes(kTokenBytes + static_cast<size_t>(align_up(int64_t(x_bytes + weight_bytes), 16))),
        partial_bytes(static_cast<size_t>(align_up(int64_t(x_bytes + weight_bytes), 16))),
        entry_bytes(kTokenBytes + partial_bytes) {
    // A window of W tokens publishes at most W rows per source rank and gets at most W partials per node.
    const size_t per_token = size_t(num_ranks) * published_bytes + size_t(nodes - 1) * entry_bytes;
    const size_t fixed = table_bytes + size_t(nodes - 1) * kTokenBytes;  // the table and the slots' counts
    window = area_bytes > fixed ? static_cast<int>(std::min<size_t>((area_bytes - fixed) / per_token, INT32_MAX)) : 0;
    slot_bytes = kTokenBytes + size_t(window) * entry_bytes;
    inbox_offset = table_bytes + size_t(num_ranks) * size_t(window) * published_bytes;
  }

  // The slot of `source`'s inbox that holds the partials of node `from_node`.
  std::byte* slot(const Area& area, const GroupGeometry& g, int source, int from_node) const {
    const int own_node = g.node_of(source);
    const int index = from_node < own_node ? from_node : from_node - 1;
    return area.of(source) + inbox_offset + size_t(index) * slot_bytes;
  }
};

// Publishes, per source rank, this rank's received rows whose source token is in [begin, end), with
// their token indices (the forwarder that reduces them does not know the source's routing).
void publish_rows(const Area& area, const RoundLayout& layout, const CombineWork& work, int rank, int begin, int end) {
  const DispatchHandle& handle = *work.handle;
  const int32_t* src_idx = handle.recv_src_idx.data_as<const int32_t>();
  std::byte* own = area.of(rank);
  auto* slices = reinterpret_cast<Slice*>(own);
  int64_t offset = static_cast<int64_t>(layout.table_bytes);
  for (int source = 0; source < handle.num_ranks; ++source) {
    const int32_t* rows_begin = src_idx + first_row_from(handle, source, rank);
    const int32_t* rows_end = src_idx + first_row_from(handle, source + 1, rank);
    const int32_t first = static_cast<int32_t>(std::lower_bound(rows_begin, rows_end, begin) - src_idx);
    const int32_t last = static_cast<int32_t>(std::lower_bound(rows_begin, rows_end, end) - src_idx);
    slices[source] = Slice{last - first, offset};
    for (int32_t row = first; row < last; ++row, offset += int64_t(layout.published_bytes)) {
      std::byte* out = own + offset;
      std::memcpy(out, &src_idx[row], sizeof(int32_t));
      std::memcpy(out + kTokenBytes, work.x + int64_t(row) * work.hidden, layout.x_bytes);
      if (work.num_topk > 0)
        std::memcpy(out + kTokenBytes + layout.x_bytes, work.topk_weights + int64_t(row) * work.num_topk,
                    layout.weight_bytes);
    }
  }
}

// One rank's published run of rows from a source, read in token order.
struct Run {
  const std::byte* next = nullptr;
  int32_t left = 0;
  int32_t token() const {
    int32_t t = 0;
    std::memcpy(&t, next, sizeof(int32_t));
    return t;
  }
};

// Reduces the rows the ranks of `node` published for `source`'s tokens, token by token in ascending
// order: emit(token, partial bf16 [hidden], weights [K]) once per token some rank of the node received.
// A run whose slice does not lie inside its publisher's area is read as empty, and `violation` set.
template <class Emit>
void reduce_node(const Area& area, const GroupGeometry& g, const RoundLayout& layout, const CombineWork& work, int node,
                 int source, std::vector<float>& acc, std::vector<uint16_t>& partial, std::vector<float>& weights,
                 std::string& violation, Emit&& emit) {
  const int G = g.ranks_per_node;
  std::vector<Run> runs(G);
  for (int i = 0; i < G; ++i) {
    const std::byte* theirs = area.of(node * G + i);
    Slice slice;
    std::memcpy(&slice, theirs + size_t(source) * sizeof(Slice), sizeof(Slice));
    const bool inside =
        slice.num_rows >= 0 && slice.offset >= int64_t(layout.table_bytes) && slice.offset <= int64_t(area.bytes) &&
        int64_t(slice.num_rows) <= (int64_t(area.bytes) - slice.offset) / int64_t(layout.published_bytes);
    if (!inside) {
      if (violation.empty())
        violation = concat("rank ", node * G + i, " published ", slice.num_rows, " rows at byte ", slice.offset,
                           " for rank ", source, ", not inside its area");
      continue;
    }
    runs[i] = Run{theirs + slice.offset, slice.num_rows};
  }
  while (true) {
    int32_t token = INT32_MAX;
    for (const Run& run : runs)
      if (run.left > 0) token = std::min(token, run.token());
    if (token == INT32_MAX) return;
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(weights.begin(), weights.end(), 0.0f);
    for (Run& run : runs) {  // ascending rank inside the node: the order SPEC fixes
      if (run.left == 0 || run.token() != token) continue;
      const auto* row = reinterpret_cast<const uint16_t*>(run.next + kTokenBytes);
      semantics::add_bf16_row(acc, row);
      const auto* w = reinterpret_cast<const float*>(run.next + kTokenBytes + layout.x_bytes);
      for (int k = 0; k < work.num_topk; ++k) weights[k] += w[k];
      run.next += layout.published_bytes;
      --run.left;
    }
    semantics::round_to_bf16(acc, partial.data());
    emit(token, partial.data(), weights.data());
  }
}

// True when some rank of `node` received this rank's token t.
bool node_received(const DispatchHandle& handle, const GroupGeometry& g, int token, int node) {
  const int32_t* rows = handle.send_row.data_as<const int32_t>() + int64_t(token) * g.num_ranks;
  for (int r = node * g.ranks_per_node; r < (node + 1) * g.ranks_per_node; ++r)
    if (rows[r] >= 0) return true;
  return false;
}

class RoundReducer {
 public:
  RoundReducer(const Area& area, const GroupGeometry& g, const RoundLayout& layout, const CombineWork& work)
      : area_(area),
        g_(g),
        layout_(layout),
        work_(work),
        acc_(work.hidden),
        partial_(work.hidden),
        weights_(work.num_topk) {}

  // As the forwarder of this node for every source of another node with this rank's local index:
  // puts one partial per (token, this node) into the source's inbox.
  void forward_partials(std::vector<int64_t>& network_bytes) {
    const int G = g_.ranks_per_node, my_node = g_.node_of(g_.rank);
    for (int node = 0; node < g_.num_nodes(); ++node) {
      if (node == my_node) continue;
      const int source = node * G + g_.rank % G;
      std::byte* slot = layout_.slot(area_, g_, source, my_node);
      int32_t count = 0;
      reduce_node(area_, g_, layout_, work_, my_node, source, acc_, partial_, weights_, violation_,
                  [&](int32_t token, const uint16_t* p, const float* w) {
                    if (count == layout_.window) {  // only rows of tokens outside the window get here
                      note(concat("the ranks of node ", my_node, " published more than ", layout_.window,
                                  " tokens of rank ", source, " for one round"));
                      return;
                    }
                    std::byte* out = slot + kTokenBytes + size_t(count++) * layout_.entry_bytes;
                    std::memcpy(out, &token, sizeof(int32_t));
                    std::memcpy(out + kTokenBytes, p, layout_.x_bytes);
                    std::memcpy(out + kTokenBytes + layout_.x_bytes, w, layout_.weight_bytes);
                    network_bytes[node] += static_cast<int64_t>(layout_.x_bytes + layout_.weight_bytes);
                  });
      std::memcpy(slot, &count, sizeof(int32_t));  // control words, not counted (a real transport signals them)
    }
  }

  // This rank's own node partials for its tokens of the window, by token - begin.
  void own_node_partials(int begin, int end) {
    const size_t n = size_t(std::max(0, end - begin));
    own_x_.assign(n * work_.hidden, 0);
    own_w_.assign(n * work_.num_topk, 0.0f);
    own_made_.assign(n, 0);
    reduce_node(area_, g_, layout_, work_, g_.node_of(g_.rank), g_.rank, acc_, partial_, weights_, violation_,
                [&](int32_t token, const uint16_t* p, const float* w) {
                  if (token < begin || token >= end || own_made_[size_t(token - begin)]) {
                    note(concat("the ranks of this node published token ", token, " of this rank (", g_.rank,
                                ") twice or outside the round's tokens [", begin, ", ", end, ")"));
                    return;
                  }
                  const size_t i = size_t(token - begin);
                  own_made_[i] = 1;
                  std::copy(p, p + work_.hidden, own_x_.begin() + i * work_.hidden);
                  std::copy(w, w + work_.num_topk, own_w_.begin() + i * work_.num_topk);
                });
  }

  // combined = bf16((b0 + b1) + p_n ascending); weights = 0 + the nodes' sums ascending.
  void finish_tokens(int begin, int end) {
    const DispatchHandle& handle = *work_.handle;
    const int my_node = g_.node_of(g_.rank);
    std::vector<int32_t> cursor(g_.num_nodes(), 0);
    std::vector<float> weight_acc(work_.num_topk);
    for (int t = begin; t < end; ++t) {
      if (!own_made_.empty() && own_made_[size_t(t - begin)] && !node_received(handle, g_, t, my_node))
        note(concat("this node made a partial of token ", t, " that send_row says none of its ranks received"));
      const int64_t base = int64_t(t) * work_.hidden;
      semantics::start_with_biases(acc_, work_.bias[0] ? work_.bias[0] + base : nullptr,
                                   work_.bias[1] ? work_.bias[1] + base : nullptr);
      std::fill(weight_acc.begin(), weight_acc.end(), 0.0f);
      for (int node = 0; node < g_.num_nodes(); ++node) {
        if (!node_received(handle, g_, t, node)) continue;
        const uint16_t* p;
        const float* w;
        if (node == my_node) {
          if (!own_made_[size_t(t - begin)]) {
            note(concat("no rank of this node published token ", t, " for its partial, which send_row expects"));
            continue;
          }
          p = &own_x_[size_t(t - begin) * work_.hidden];
          w = &own_w_[size_t(t - begin) * work_.num_topk];
        } else {
          const std::byte* row = received_partial(node, t, cursor[node]++);
          if (row == nullptr) continue;
          p = reinterpret_cast<const uint16_t*>(row);
          w = reinterpret_cast<const float*>(row + layout_.x_bytes);
        }
        semantics::add_bf16_row(acc_, p);
        for (int k = 0; k < work_.num_topk; ++k) weight_acc[k] += w[k];
      }
      uint16_t* out = work_.combined_x + base;
      semantics::round_to_bf16(acc_, out);
      if (work_.combined_weights)
        std::copy(weight_acc.begin(), weight_acc.end(), work_.combined_weights + int64_t(t) * work_.num_topk);
    }
    for (int node = 0; node < g_.num_nodes(); ++node)
      if (node != my_node && cursor[node] < partials_put(node))
        note(concat("the forwarder of node ", node, " put ", partials_put(node), " partials for tokens [", begin, ", ",
                    end, ") of this rank (", g_.rank, "), send_row expects ", cursor[node]));
  }

  // The first fault seen, or "": a receiver never trusts its senders.
  const std::string& violation() const { return violation_; }

 private:
  void note(std::string message) {
    if (violation_.empty()) violation_ = std::move(message);
  }

  // The partial count the forwarder of `node` put into this rank's inbox this round.
  int32_t partials_put(int node) const {
    int32_t count = 0;
    std::memcpy(&count, layout_.slot(area_, g_, g_.rank, node), sizeof(int32_t));
    return count;
  }

  // The `index`-th partial the forwarder of `node` put this round, checked to be token t's; else
  // nullptr, and the fault noted.
  const std::byte* received_partial(int node, int token, int32_t index) {
    const std::byte* slot = layout_.slot(area_, g_, g_.rank, node);
    const int32_t count = partials_put(node);
    int32_t put_token = -1;
    if (index < count && count <= layout_.window)
      std::memcpy(&put_token, slot + kTokenBytes + size_t(index) * layout_.entry_bytes, sizeof(int32_t));
    if (put_token == token) return slot + kTokenBytes + size_t(index) * layout_.entry_bytes + kTokenBytes;
    note(concat("the forwarder of node ", node, " put ", count, " partials for this rank (", g_.rank, "), partial ",
                index, " not of token ", token, " as send_row expects"));
    return nullptr;
  }

  const Area& area_;
  const GroupGeometry& g_;
  const RoundLayout& layout_;
  const CombineWork& work_;
  std::vector<float> acc_;
  std::vector<uint16_t> partial_;
  std::vector<float> weights_;
  std::vector<uint16_t> own_x_;
  std::vector<float> own_w_;
  std::vector<uint8_t> own_made_;  // [W]: the own node made token begin + i's partial
  std::string violation_;
};

}  // namespace

size_t internode_combine_min_bytes(int num_ranks, int num_nodes, int hidden, int num_topk) {
  const RoundLayout layout(num_ranks, num_nodes, hidden, num_topk, 0);
  return layout.table_bytes + size_t(num_ranks) * layout.published_bytes +
         size_t(num_nodes - 1) * (kTokenBytes + layout.entry_bytes);
}

size_t network_bytes_per_partial(int hidden, int num_topk) { return size_t(hidden) * 2 + size_t(num_topk) * 4; }

std::vector<int64_t> combine_rows_across_nodes(const Area& area, GroupSync& sync, const GroupGeometry& geometry,
                                               const CombineWork& work, const char* op) {
  const DispatchHandle& handle = *work.handle;
  const RoundLayout layout(handle.num_ranks, geometry.num_nodes(), work.hidden, work.num_topk, area.bytes);
  const std::vector<int32_t>& num_tokens = handle_state(handle).num_tokens;
  const int max_tokens = *std::max_element(num_tokens.begin(), num_tokens.end());
  const std::string step = concat(op, " (token rounds across nodes)");
  std::vector<int64_t> network_bytes(geometry.num_nodes(), 0);
  RoundReducer reducer(area, geometry, layout, work);

  for (int begin = 0; begin < max_tokens; begin += layout.window) {
    const int end = begin + std::min(layout.window, max_tokens - begin);
    publish_rows(area, layout, work, geometry.rank, begin, end);
    sync.barrier(kNormalChannel, step.c_str());
    reducer.forward_partials(network_bytes);
    const int own_end = std::min(end, handle.num_tokens);
    reducer.own_node_partials(begin, own_end);
    sync.barrier(kNormalChannel, step.c_str());
    reducer.finish_tokens(begin, own_end);
    sync.barrier(kNormalChannel, step.c_str());
  }
  if (!reducer.violation().empty())
    throw_error(ErrorCode::kPeerFailure,
                concat(op, ": ", reducer.violation(), " (a receiver never trusts its senders)"));
  return network_bytes;
}

}  // namespace epcomm::cpu
