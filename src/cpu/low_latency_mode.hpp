// Low-latency mode of the CPU reference backend (SPEC §4). CpuBackend forwards its low-latency
// calls here; arguments arrive checked by the front (core/op_checks.cpp).
#pragma once

#include "cpu/cpu_context.hpp"

namespace epcomm::cpu {

class LowLatencyMode {
 public:
  // `area` is the low-latency area (num_rdma_bytes) of every rank.
  LowLatencyMode(const CpuContext& ctx, Area area);
  ~LowLatencyMode();
  LowLatencyMode(const LowLatencyMode&) = delete;
  LowLatencyMode& operator=(const LowLatencyMode&) = delete;

  LowLatencyDispatchResult dispatch(const LowLatencyDispatchArgs& args, const LowLatencyOptions& options);
  LowLatencyCombineResult combine(const LowLatencyCombineArgs& args, const LowLatencyOptions& options);
  TensorView next_combine_buffer(const LowLatencyHandle& handle);
  // Collective; every rank must pass the same sizes (else all raise, naming both).
  void clean(int max_tokens_per_rank, int hidden, int num_experts);
  // Collective: the call's exchange with a rejected header (low_latency_exchange.hpp), at once.
  void reject(CollectiveKind kind, const Error& error);

  void update_mask(int rank, bool mask);
  TensorView query_mask();
  void clean_mask();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace epcomm::cpu
