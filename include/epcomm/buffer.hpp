// epcomm::Buffer: the communication memory of one rank and every operation of SPEC.md on it.
//
//   auto bootstrap = epcomm::bootstrap_from_env();
//   epcomm::BufferOptions options{.backend = epcomm::BackendKind::kCuda,
//                                 .num_nvl_bytes = epcomm::default_dispatch_config(R).nvl_buffer_size_hint(hidden * 2,
//                                 R)};
//   epcomm::Buffer buffer(*bootstrap, options);
//   auto layout = buffer.get_dispatch_layout(topk_idx, num_experts);
//   auto dispatched = buffer.dispatch({.x = x, .topk_idx = topk_idx, .topk_weights = weights});
//   ... experts ...
//   auto combined = buffer.combine({.x = expert_out, .handle = dispatched.handle.get()});
//
// Construction and destroy() are collective over the Bootstrap's group; so is every operation.
// A Buffer is not thread-safe: one thread drives it.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"
#include "epcomm/error.hpp"
#include "epcomm/ops.hpp"
#include "epcomm/tensor.hpp"

namespace epcomm {

enum class BackendKind : uint8_t {
  kCpu,   // ranks are processes of one machine, memory is POSIX shared memory, tensors on the CPU
  kCuda,  // one GPU per rank, NVLink (CUDA IPC) inside a node, NVSHMEM for low-latency mode
};
const char* to_string(BackendKind kind);
// True if this build of epcomm contains the backend.
bool backend_available(BackendKind kind);

struct BufferOptions {
  BackendKind backend = BackendKind::kCuda;
  int64_t num_nvl_bytes = 0;   // normal-mode memory shared inside a node (see Config hints)
  int64_t num_rdma_bytes = 0;  // low-latency memory (low_latency_buffer_size_hint), or inter-node
  bool low_latency_mode = false;
  // G, ranks per node (SPEC §3.6). 0 = $EPCOMM_RANKS_PER_NODE, else $LOCAL_WORLD_SIZE (capped at R),
  // else every rank of the group in one node. options() returns the resolved value.
  int ranks_per_node = 0;
  int device = -1;  // CUDA device of this rank; -1 = the current device
  // Longest any wait for a peer may take; 0 = $EPCOMM_TIMEOUT_S seconds, else 100 s.
  std::chrono::milliseconds timeout{0};
  // Accepted for DeepEP compatibility.
  int num_qps_per_rank = 24;
  bool allow_nvlink_for_low_latency_mode = true;
  bool allow_mnnvl = false;
  bool use_fabric = false;
  bool explicitly_destroy = false;
  bool enable_shrink = false;  // mask failed ranks in low-latency mode instead of timing out
  // CUDA backend: the stream normal-mode work runs on (comm_stream()). nullptr: the Buffer creates
  // one and destroys it in destroy(). A caller's stream must outlive the Buffer and any later use of
  // it — e.g. a framework that records tensor uses on it (PyTorch's record_stream) passes one of its
  // own, never-destroyed pool streams, so that freeing such a tensor after destroy() stays valid.
  StreamHandle comm_stream = nullptr;
};

class Backend;  // internal

class Buffer {
 public:
  // Collective. Allocates and shares the communication memory. Throws epcomm::Error.
  Buffer(Bootstrap& bootstrap, const BufferOptions& options);
  // Releases the memory without talking to peers if destroy() was not called. Never throws.
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // Collective. Releases everything; further calls throw. Idempotent.
  void destroy();

  int rank() const;
  int num_ranks() const;
  int ranks_per_node() const;
  const BufferOptions& options() const;
  Device device() const;
  StreamHandle comm_stream() const;  // nullptr on the CPU backend

  // ---- high-throughput mode (SPEC §3) ----
  LayoutResult get_dispatch_layout(const TensorView& topk_idx, int num_experts, const StreamOptions& stream = {});
  // Fresh routing (topk_idx / is_token_in_rank given) or cached dispatch (handle given).
  DispatchResult dispatch(const DispatchInputs& inputs, const StreamOptions& stream = {});
  CombineResult combine(const CombineInputs& inputs, const StreamOptions& stream = {});

  // Errors of asynchronous GPU work (a peer that timed out, topk_idx values outside [-1, E), a
  // num_worst_tokens dispatch that overflowed, ranks making different calls) are recorded by the
  // kernels and thrown by the next call of this buffer. check_errors() throws them now instead: it
  // waits for the work queued on the comm stream (synchronise the stream of a CUDA-graph replay
  // first), then throws the first recorded error. The CPU backend throws from the call itself.
  void check_errors();

  // ---- low-latency mode (SPEC §4) ----
  LowLatencyDispatchResult low_latency_dispatch(const LowLatencyDispatchInputs& inputs,
                                                const LowLatencyOptions& options = {});
  LowLatencyCombineResult low_latency_combine(const LowLatencyCombineInputs& inputs,
                                              const LowLatencyOptions& options = {});
  // [L, R*T_max, hidden] bf16 view of communication memory that the next zero_copy combine reads.
  TensorView next_low_latency_combine_buffer(const LowLatencyHandle& handle);
  // Collective: resets the low-latency state (SPEC §4.3).
  void clean_low_latency_buffer(int max_tokens_per_rank, int hidden, int num_experts, StreamHandle stream = nullptr);

  // ---- rank masking with enable_shrink (SPEC §6) ----
  void low_latency_update_mask_buffer(int rank, bool mask, StreamHandle stream = nullptr);
  // [R] int32 view: 1 where a rank is masked.
  TensorView low_latency_query_mask_buffer();
  void low_latency_clean_mask_buffer(StreamHandle stream = nullptr);

  // A view of this rank's own communication memory (SPEC §6 get_local_buffer_tensor).
  TensorView local_buffer(DType dtype, int64_t offset_bytes, std::optional<int64_t> num_elements,
                          bool rdma_memory) const;

 private:
  Backend& live_backend(const char* operation) const;

  std::unique_ptr<Backend> backend_;
  BufferOptions options_;
};

}  // namespace epcomm
