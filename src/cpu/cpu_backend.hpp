// The CPU reference backend: ranks are processes of one machine, communication memory is one POSIX
// shared-memory segment per rank (cpu_context.hpp shows its layout), every call completes before it
// returns. It defines the semantics the CUDA backend is tested against.
#pragma once

#include <memory>

#include "cpu/cpu_context.hpp"
#include "cpu/low_latency_mode.hpp"
#include "cpu/normal_mode.hpp"

namespace epcomm::cpu {

Limits reference_limits();

class CpuBackend final : public Backend {
 public:
  // Collective over `bootstrap`: maps every rank's segment.
  CpuBackend(Bootstrap& bootstrap, const BufferOptions& options, const GroupGeometry& geometry);
  ~CpuBackend() override;

  const GroupGeometry& geometry() const override { return geometry_; }
  Device device() const override { return Device::cpu(); }
  const Limits& limits() const override { return limits_; }

  LayoutResult layout(const LayoutArgs& args, const StreamOptions& stream) override;
  DispatchResult dispatch(const DispatchArgs& args, const StreamOptions& stream) override;
  CombineResult combine(const CombineArgs& args, const StreamOptions& stream) override;

  LowLatencyDispatchResult low_latency_dispatch(const LowLatencyDispatchArgs& args,
                                                const LowLatencyOptions& options) override;
  LowLatencyCombineResult low_latency_combine(const LowLatencyCombineArgs& args,
                                              const LowLatencyOptions& options) override;
  TensorView next_low_latency_combine_buffer(const LowLatencyHandle& handle) override;
  void clean_low_latency_buffer(int max_tokens_per_rank, int hidden, int num_experts, StreamHandle stream) override;

  void update_mask(int rank, bool mask, StreamHandle stream) override;
  TensorView query_mask() override;
  void clean_mask(StreamHandle stream) override;

  TensorView local_buffer(DType dtype, int64_t offset_bytes, std::optional<int64_t> num_elements,
                          bool rdma_memory) const override;

  // Both protocols publish a rejected entry (normal_exchange.hpp, low_latency_exchange.hpp).
  bool reject_call(CollectiveKind kind, const Error& error) override;
  void mark_failed(const std::string& cause) noexcept override;
  std::string failure() const override { return released_ ? "" : sync_.failure_of(geometry_.rank); }

  // collective: a barrier on kLifecycleChannel first (its timeout is still thrown, after releasing).
  // With enable_shrink, ranks masked in low-latency mode are not waited for, and a rank masked in
  // its own mask does not wait at all (DeepEP's shrink test: "failed" ranks leave while survivors run).
  void destroy(bool collective) override;

 private:
  LowLatencyMode& low_latency(const char* op);
  void release() noexcept;

  GroupGeometry geometry_;
  BufferOptions options_;
  PeerMemory memory_;
  Area nvl_area_;   // normal mode
  Area rdma_area_;  // low-latency mode, page-aligned so that views of it suit any dtype
  GroupSync sync_;
  CpuContext context_;
  std::unique_ptr<NormalMode> normal_;
  std::unique_ptr<LowLatencyMode> low_latency_;
  Limits limits_;
  bool released_ = false;
};

}  // namespace epcomm::cpu
