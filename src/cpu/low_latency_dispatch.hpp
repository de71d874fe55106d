// One low-latency dispatch of the CPU backend (SPEC §4.1): the send half is the constructor (checks
// the expert ids, snapshots x and topk_idx, allocates the outputs), the receive half is receive()
// (the protocol of low_latency_exchange.hpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "core/backend.hpp"
#include "cpu/low_latency_exchange.hpp"

namespace epcomm::cpu {

class LowLatencyDispatchCall {
 public:
  LowLatencyDispatchCall(const LowLatencyDispatchArgs& args, const LowLatencyOptions& options, uint64_t call_id,
                         const GroupGeometry& geometry);

  // The outputs; their contents are valid once receive() returned.
  LowLatencyDispatchResult result() const;

  // Publishes this rank's tokens, gathers the ones for its local experts from every unmasked rank
  // (source rank ascending, then source token ascending), updates the stats. Collective.
  void receive(LowLatencyExchange& exchange);

  // Set by the first receive(): a hook runs at most once.
  std::atomic<bool> started{false};

 private:
  CallHeader header() const;
  void publish_tokens(LowLatencyExchange& exchange, const Regions& regions) const;
  void gather_tokens(const LowLatencyExchange& exchange, const Regions& regions);
  void store_row(int local_expert, int row, const uint16_t* token);
  void add_stats(const WaitTimes& waited) const;

  uint64_t call_id_;
  int rank_, num_ranks_;
  int num_tokens_, hidden_, num_topk_, num_experts_, num_local_experts_, max_tokens_per_rank_;
  RecvFormat format_;
  std::vector<uint16_t> x_;               // [T, hidden] bf16 bits, snapshot of the input
  std::vector<int32_t> topk_idx_;         // [T, K], snapshot of the input
  std::optional<TensorView> recv_stats_;  // [L] int32, the caller's
  std::optional<TensorView> wait_stats_;  // [R] int64, the caller's

  Tensor recv_x_;  // [L, R*T_max, hidden] bf16 or e4m3
  // fp8: [L, R*T_max, hidden/128] float32 or [L, R*T_max, hidden/512] int32 (ue8m0), column-major in
  // its last two dims: the storage is [L, S, R*T_max], which store_row indexes.
  Tensor recv_scales_;
  Tensor recv_count_;    // [L] int32
  Tensor src_info_;      // [L, R*T_max] int32
  Tensor layout_range_;  // [L, R] int64
};

}  // namespace epcomm::cpu
