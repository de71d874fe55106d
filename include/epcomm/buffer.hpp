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
//
// Fail-safe (SPEC §5): a bad input on one rank is reported to its peers within the same call (all
// ranks raise, the Buffer stays usable); a timeout, a peer failure or a kernel-detected error inside a
// call marks the Buffer failed: every later operation throws Error(kBufferFailed) naming that first
// cause, destroy() still releases everything, and a new Buffer works.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"
#include "epcomm/config.hpp"
#include "epcomm/error.hpp"
#include "epcomm/limits.hpp"
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

// Low-latency mode: which peers get NVSHMEM puts instead of plain stores over NVLink (SPEC §4.2b).
// Results are bit-identical either way; only the path differs.
enum class LowLatencyPutPath : uint8_t {
  kAuto,    // puts for the peers of other nodes (ranks_per_node < R) and for any peer NVSHMEM cannot map
  kMapped,  // puts only for the peers NVSHMEM cannot map (stores across nodes where NVLink spans them)
  kAll,     // puts for every peer, this rank included (tests); also when allow_nvlink_for_low_latency_mode
            // is false
};

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
  // DeepEP's flag, read by the CUDA low-latency put path: false = no NVLink stores in low-latency
  // mode, every peer gets NVSHMEM puts (LowLatencyPutPath::kAll). DeepEP's other options that
  // nothing here reads (num_qps_per_rank, allow_mnnvl, use_fabric, explicitly_destroy) are accepted
  // by the Python front end only.
  bool allow_nvlink_for_low_latency_mode = true;
  bool enable_shrink = false;  // mask failed ranks in low-latency mode instead of timing out
  // kAuto: $EPCOMM_LL_PUT_PATH (auto, mapped or all) when set, else as kAuto says.
  LowLatencyPutPath low_latency_put_path = LowLatencyPutPath::kAuto;
  // CUDA backend: the stream normal-mode work runs on (comm_stream()). nullptr: the Buffer creates
  // one and destroys it in destroy(). A caller's stream must outlive the Buffer and any later use of
  // it — e.g. a framework that records tensor uses on it (PyTorch's record_stream) passes one of its
  // own, never-destroyed pool streams, so that freeing such a tensor after destroy() stays valid.
  StreamHandle comm_stream = nullptr;
};

// The collective calls of a Buffer, as the fail-safe protocol names them (SPEC §5). Public for
// Buffer::reject_inputs; the backends number and exchange them.
enum class CollectiveKind : int32_t {
  kDispatch = 1,
  kCachedDispatch = 2,  // dispatch given a handle
  kCombine = 3,
  kLowLatencyDispatch = 4,
  kLowLatencyCombine = 5,
  kCleanLowLatency = 6,
};
const char* to_string(CollectiveKind kind);

class Backend;  // internal

class Buffer {
 public:
  // Collective. Allocates and shares the communication memory. Throws epcomm::Error.
  Buffer(Bootstrap& bootstrap, const BufferOptions& options);
  // Releases the memory without talking to peers if destroy() was not called. Never throws.
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // Collective. Releases everything; further calls throw. Idempotent. Works on a failed Buffer.
  // With enable_shrink, ranks masked with low_latency_update_mask_buffer are not waited for, and a
  // rank masked in its own mask leaves without waiting for anyone.
  void destroy();

  // The first cause of the failed state, or "" while the Buffer is usable.
  std::string failure() const;

  int rank() const;
  int num_ranks() const;
  int ranks_per_node() const;
  const BufferOptions& options() const;
  Device device() const;
  StreamHandle comm_stream() const;  // nullptr on the CPU backend
  // What this Buffer's backend accepts on its device (epcomm/limits.hpp). A call inside these
  // limits is never rejected as unsupported.
  const Limits& limits() const;

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

  // Collective, for front ends that check some arguments themselves before calling (the Python
  // package): this rank rejects its inputs of the call `kind` with `error`, an input error
  // (kInvalidArgument, kUnsupported or kOutOfCapacity). It takes part in that call exactly as a call
  // whose own checks failed (the same path), so every peer raises "rank r rejected its inputs of this
  // call: <message>" at the same call and the Buffer stays usable. Returns without throwing `error`:
  // the caller raises its own. Throws kBufferFailed on a failed Buffer, like the call would.
  void reject_inputs(CollectiveKind kind, const Error& error);

  // ---- rank masking with enable_shrink (SPEC §6) ----
  void low_latency_update_mask_buffer(int rank, bool mask, StreamHandle stream = nullptr);
  // [R] int32 view: 1 where a rank is masked.
  TensorView low_latency_query_mask_buffer();
  void low_latency_clean_mask_buffer(StreamHandle stream = nullptr);

  // Low-latency mode: entry r is true when this rank reaches rank r with NVSHMEM puts instead of
  // NVLink stores (SPEC §4.2b; BufferOptions::low_latency_put_path). All false on the CPU backend,
  // which has no put path. For tests and diagnostics.
  std::vector<bool> low_latency_put_peers() const;

  // A view of this rank's own communication memory (SPEC §6 get_local_buffer_tensor). Valid until
  // destroy(): the memory is unmapped then, and a view used afterwards reads or writes freed memory.
  TensorView local_buffer(DType dtype, int64_t offset_bytes, std::optional<int64_t> num_elements,
                          bool rdma_memory) const;

 private:
  // The backend while the Buffer is not destroyed (accessors).
  Backend& live_backend(const char* operation) const;
  // The backend for an operation: also throws kBufferFailed once the Buffer failed.
  Backend& usable_backend(const char* operation) const;
  // Runs an operation's backend work; a timeout / peer failure / internal error marks the Buffer failed.
  template <class Work>
  auto guarded(const char* operation, Work&& work);
  // Runs the front checks of a collective call; a failure is first reported to the peers (reject_call).
  template <class Check>
  auto checked(Backend& backend, CollectiveKind kind, Check&& check);
  void reject(Backend& backend, CollectiveKind kind, const Error& error);
  void note_failure(const char* operation, const Error& error);
  void mark_failed(const std::string& cause);

  std::unique_ptr<Backend> backend_;
  BufferOptions options_;
  mutable std::string failure_;  // first cause of the failed state; "" = usable
};

}  // namespace epcomm
