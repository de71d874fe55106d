// The CUDA backend (BackendKind::kCuda): one GPU per rank. High-throughput mode moves tokens over
// NVLink through memory shared with CUDA IPC inside a node (normal/normal_mode.hpp); low-latency mode
// is forwarded to LowLatencyMode (NVSHMEM, low_latency/).
//
// Asynchronous errors: kernels record timeouts and data errors (bad topk_idx values, num_worst_tokens
// overflow, ranks making different calls) in a device error word instead of trapping. They surface as
// epcomm::Error at the start of the next call of this buffer, inside the host wait of a fresh
// dispatch, or from check_errors(). After a timeout only destroy() is guaranteed to work (every call
// throws the timeout again).
#pragma once

#include <memory>

#include "core/backend.hpp"
#include "cuda/cuda_context.hpp"
#include "cuda/low_latency/low_latency_mode.hpp"
#include "cuda/normal/normal_memory.hpp"
#include "cuda/normal/normal_mode.hpp"

namespace epcomm::cuda {

class CudaBackend final : public Backend {
 public:
  // Collective over `bootstrap`, which must stay alive until destroy(true).
  CudaBackend(Bootstrap& bootstrap, const BufferOptions& options, const GroupGeometry& geometry);
  ~CudaBackend() override;

  const GroupGeometry& geometry() const override { return ctx_.geometry; }
  Device device() const override { return ctx_.tensor_device(); }
  const Limits& limits() const override { return limits_; }
  StreamHandle comm_stream() const override { return reinterpret_cast<StreamHandle>(ctx_.comm_stream); }

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

  // Normal mode: the rejection changes this rank's later call signatures (normal/protocol.hpp
  // with_rejections), so that its peers never pair its next call with the one it skipped. Low-latency
  // dispatch / combine: the rejected call takes its parity (LowLatencyMode::skip_call), so a rank that
  // rejected alone meets its peers on the other parity (a timeout, never mixed data) and ranks that all
  // rejected stay in step. clean_low_latency_buffer: false (the front then fails the Buffer).
  bool reject_call(CollectiveKind kind, const Error& error) override;

  // Waits for the work queued on the comm stream, then throws the first error a kernel recorded.
  void check_errors() override;
  std::vector<bool> low_latency_put_peers() const override;
  void destroy(bool collective) override;

 private:
  // Start of every call: the device, and any error recorded since the last check.
  void begin_call() const;
  LowLatencyMode& low_latency(const char* op) const;

  BufferOptions options_;
  CudaContext ctx_;
  Limits limits_;  // cuda_backend_limits(), num_sms capped at this GPU's SMs
  std::unique_ptr<DeviceErrors> errors_;
  std::unique_ptr<NormalMemory> normal_memory_;
  std::unique_ptr<NormalMode> normal_;
  std::unique_ptr<LowLatencyMode> low_latency_;
  bool destroyed_ = false;
  bool owns_comm_stream_ = true;  // false: BufferOptions::comm_stream, the caller's
};

}  // namespace epcomm::cuda
