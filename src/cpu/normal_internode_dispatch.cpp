#include "cpu/normal_internode_dispatch.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/check.hpp"
#include "core/layouts.hpp"

namespace epcomm::cpu {
namespace {

constexpr size_t kWordBytes = 16;  // a count or a token index, padded so records stay 16-byte aligned

// Offsets of one round's regions; see the header.
struct RoundLayout {
  size_t record_bytes = 0;
  size_t entry_bytes = 0;  // token index + record
  int window = 0;          // W
  size_t window_bytes = 0;
  size_t slot_bytes = 0;

  RoundLayout(const TokenRecord& record, int num_nodes, size_t area_bytes)
      : record_bytes(record.bytes()), entry_bytes(kWordBytes + record.bytes()) {
    const size_t slots = size_t(num_nodes - 1);
    const size_t per_token = record_bytes + slots * entry_bytes;
    window = static_cast<int>(std::min<size_t>((area_bytes - slots * kWordBytes) / per_token, INT32_MAX));
    window_bytes = size_t(window) * record_bytes;
    slot_bytes = kWordBytes + size_t(window) * entry_bytes;
  }

  // The slot of `inbox_rank`'s area that holds entries from sources on node `from_node`.
  std::byte* slot(const Area& area, const GroupGeometry& g, int inbox_rank, int from_node) const {
    const int own_node = g.node_of(inbox_rank);
    const int index = from_node < own_node ? from_node : from_node - 1;
    return area.of(inbox_rank) + window_bytes + size_t(index) * slot_bytes;
  }
};

bool goes_to_node(const DispatchSend& send, const GroupGeometry& g, int token, int node) {
  const uint8_t* flags = send.in_rank + size_t(token) * g.num_ranks + size_t(node) * g.ranks_per_node;
  return std::any_of(flags, flags + g.ranks_per_node, [](uint8_t f) { return f != 0; });
}

// Writes this rank's window, then puts each token once into the inbox of every other node it goes
// to. Adds the bytes put to `network_bytes`.
void publish_round(const Area& area, const GroupGeometry& g, const RoundLayout& layout, const TokenRecord& record,
                   const DispatchSend& send, int begin, int end, std::vector<int64_t>& network_bytes) {
  const int me = g.rank, my_node = g.node_of(me), local = me % g.ranks_per_node;
  std::byte* own = area.of(me);
  for (int t = begin; t < end; ++t) write_record(record, own + size_t(t - begin) * layout.record_bytes, send, t);
  for (int node = 0; node < g.num_nodes(); ++node) {
    if (node == my_node) continue;
    std::byte* slot = layout.slot(area, g, node * g.ranks_per_node + local, my_node);
    int32_t count = 0;
    for (int t = begin; t < end; ++t) {
      if (!goes_to_node(send, g, t, node)) continue;
      std::byte* entry = slot + kWordBytes + size_t(count++) * layout.entry_bytes;
      std::memcpy(entry, &t, sizeof(int32_t));
      std::memcpy(entry + kWordBytes, own + size_t(t - begin) * layout.record_bytes, layout.record_bytes);
      network_bytes[node] += static_cast<int64_t>(sizeof(int32_t) + layout.record_bytes);
    }
    std::memcpy(slot, &count, sizeof(int32_t));  // a control word, not counted (a real transport signals it)
  }
}

// Copies record `r` (source token `token`) into the next row of `source`, unless the source already
// filled the rows it announced: a receiver never trusts its senders, and the first violation is
// raised once the rounds are over (so that the peers finish theirs).
void take_record(const TokenRecord& record, const std::byte* r, DispatchReceive& receive, int source, int token,
                 std::vector<int32_t>& next_row, int me, std::string& violation) {
  if (next_row[source] < receive.end_row[source]) return read_record(record, r, receive, next_row[source]++, token);
  if (violation.empty())
    violation = concat("rank ", source, " flagged more tokens for this rank (", me, ") than the ",
                       receive.end_row[source] - receive.first_row[source], " it announced");
}

// Reads, source by source in ascending order, the records of the round flagged for this rank: from
// the source's window when it is on this node, else from the inbox of this node's forwarder for it.
void receive_round(const Area& area, const GroupGeometry& g, const RoundLayout& layout, const TokenRecord& record,
                   DispatchReceive& receive, const std::vector<int32_t>& num_tokens, int begin,
                   std::vector<int32_t>& next_row, std::string& violation) {
  const int me = g.rank, my_node = g.node_of(me);
  const size_t my_flag = record.flags_offset() + size_t(me);
  for (int source = 0; source < g.num_ranks; ++source) {
    if (g.node_of(source) == my_node) {
      const std::byte* theirs = area.of(source);
      for (int t = begin; t < std::min(num_tokens[source], begin + layout.window); ++t) {
        const std::byte* r = theirs + size_t(t - begin) * layout.record_bytes;
        if (r[my_flag] != std::byte{0}) take_record(record, r, receive, source, t, next_row, me, violation);
      }
      continue;
    }
    const int forwarder = my_node * g.ranks_per_node + source % g.ranks_per_node;
    const std::byte* slot = layout.slot(area, g, forwarder, g.node_of(source));
    int32_t count = 0;
    std::memcpy(&count, slot, sizeof(int32_t));
    if (count < 0 || count > layout.window) {  // the slot holds at most one window of entries
      if (violation.empty())
        violation = concat("rank ", forwarder, "'s inbox for rank ", source, " announces ", count,
                           " tokens, outside [0, ", layout.window, "]");
      continue;
    }
    for (int32_t i = 0; i < count; ++i) {
      const std::byte* entry = slot + kWordBytes + size_t(i) * layout.entry_bytes;
      int32_t token = 0;
      std::memcpy(&token, entry, sizeof(int32_t));
      const std::byte* r = entry + kWordBytes;
      if (r[my_flag] != std::byte{0}) take_record(record, r, receive, source, token, next_row, me, violation);
    }
  }
}

}  // namespace

size_t internode_dispatch_min_bytes(const TokenRecord& record, int num_nodes) {
  return record.bytes() + size_t(num_nodes - 1) * (2 * kWordBytes + record.bytes());
}

size_t network_bytes_per_token(const TokenRecord& record) { return sizeof(int32_t) + record.bytes(); }

std::vector<int64_t> move_tokens_across_nodes(const Area& area, GroupSync& sync, const GroupGeometry& geometry,
                                              const TokenRecord& record, const DispatchSend& send,
                                              DispatchReceive& receive, const std::vector<int32_t>& num_tokens,
                                              const char* op) {
  const RoundLayout layout(record, geometry.num_nodes(), area.bytes);
  const int max_tokens = *std::max_element(num_tokens.begin(), num_tokens.end());
  const std::string step = concat(op, " (token rounds across nodes)");
  std::vector<int32_t> next_row = receive.first_row;
  std::vector<int64_t> network_bytes(geometry.num_nodes(), 0);
  std::string violation;  // the first sender that flagged more tokens for this rank than it announced

  for (int begin = 0; begin < max_tokens; begin += layout.window) {
    const int end = std::min(send.num_tokens, begin + layout.window);
    publish_round(area, geometry, layout, record, send, begin, std::max(begin, end), network_bytes);
    sync.barrier(kNormalChannel, step.c_str());
    receive_round(area, geometry, layout, record, receive, num_tokens, begin, next_row, violation);
    sync.barrier(kNormalChannel, step.c_str());
  }
  for (int source = 0; source < geometry.num_ranks && violation.empty(); ++source)
    if (next_row[source] != receive.end_row[source])
      violation =
          concat("rank ", source, " flagged ", next_row[source] - receive.first_row[source], " tokens for this rank (",
                 geometry.rank, ") but announced ", receive.end_row[source] - receive.first_row[source]);
  if (!violation.empty())
    throw_error(ErrorCode::kPeerFailure, concat(op, ": ", violation, " (a receiver never trusts its senders)"));
  const int num_real = receive.end_row[geometry.num_ranks - 1];
  for (int row = num_real; row < receive.num_rows; ++row) clear_row(record, receive, row);
  return network_bytes;
}

}  // namespace epcomm::cpu
