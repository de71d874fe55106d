// One low-latency combine of the CPU backend (SPEC §4.2): the send half is the constructor (checks
// the handle and the expert ids, snapshots the valid rows of x, topk_idx and topk_weights), the
// receive half is receive() (the protocol of low_latency_exchange.hpp). With use_logfmt the rows
// travel in LogFMT (core/logfmt.hpp, docs/LOGFMT.md): encoded by the sender, decoded by the reducer.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "core/backend.hpp"
#include "cpu/low_latency_exchange.hpp"

namespace epcomm::cpu {

class LowLatencyCombineCall {
 public:
  // `zero_copy_x`: with zero_copy, this rank's zero-copy region (read instead of x's memory).
  LowLatencyCombineCall(const LowLatencyCombineArgs& args, const LowLatencyOptions& options, uint64_t call_id,
                        const GroupGeometry& geometry, const std::byte* zero_copy_x);

  // The output; its contents are valid once receive() returned.
  LowLatencyCombineResult result() const;

  // Publishes this rank's routing, sends every valid row of x to the rank its token came from, then
  // reduces the rows sent to this rank. Collective.
  void receive(LowLatencyExchange& exchange);

  // Set by the first receive(): a hook runs at most once.
  std::atomic<bool> started{false};

 private:
  // One valid row of x: row `row` of local expert `local_expert`, token `src_token` of `src_rank`.
  struct ExpertRow {
    int local_expert, src_rank, src_token;
  };

  CallHeader header() const;
  void snapshot_rows(const LowLatencyHandle& handle, const std::byte* x);
  void publish_routing(LowLatencyExchange& exchange, const Regions& regions) const;
  void send_rows(LowLatencyExchange& exchange, const Regions& regions) const;
  void check_every_slot_arrived(const LowLatencyExchange& exchange, const Regions& regions) const;
  void reduce(const LowLatencyExchange& exchange, const Regions& regions);
  bool contributes(const LowLatencyExchange& exchange, int token, int slot) const;
  // The bytes of row i as they travel: bf16, or LogFMT-encoded into `scratch`.
  const std::byte* wire_row(size_t i, std::vector<uint8_t>& scratch) const;
  int64_t wire_row_bytes() const;
  // Row bf16 values of the slot at `from` (a wire row) into `row`.
  void read_wire_row(const std::byte* from, std::vector<uint16_t>& row) const;

  uint64_t call_id_;
  int rank_, num_ranks_;
  int num_tokens_, hidden_, num_topk_, num_experts_, num_local_experts_, max_tokens_per_rank_;
  bool use_logfmt_;
  std::vector<ExpertRow> rows_;           // valid rows of x, in (local expert, row) order
  std::vector<uint16_t> row_data_;        // [rows_.size(), hidden] bf16 bits
  std::vector<int32_t> topk_idx_;         // [T, K]
  std::vector<float> topk_weights_;       // [T, K]
  std::optional<TensorView> wait_stats_;  // [R] int64, the caller's
  Tensor out_;                            // [T, hidden] bf16 (the caller's `out` when given)
};

}  // namespace epcomm::cpu
