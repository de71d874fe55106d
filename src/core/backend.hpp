// The interface between the front (epcomm::Buffer: argument checks, defaults) and a backend (CPU
// reference or CUDA). A backend receives arguments that are already checked for shape, dtype and
// device, with the derived sizes filled in; it checks only what needs the data itself (index values
// on the CPU, capacities) and does the work.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/limits.hpp"
#include "epcomm/ops.hpp"

namespace epcomm {

// Who is in the group and how it splits into NVLink domains ("nodes").
struct GroupGeometry {
  int rank = 0;
  int num_ranks = 1;       // R
  int ranks_per_node = 1;  // G
  int num_nodes() const { return num_ranks / ranks_per_node; }
  int node_of(int r) const { return r / ranks_per_node; }
};

struct LayoutArgs {
  TensorView topk_idx;  // [T, K] int64 / int32
  int num_tokens = 0;   // T
  int num_topk = 0;     // K
  int num_experts = 0;  // E
};

struct DispatchArgs {
  const DispatchInputs* inputs = nullptr;  // checked: shapes, dtypes, devices
  bool cached = false;                     // routing comes from inputs->handle
  bool fp8 = false;                        // x is float8_e4m3 with scales
  int num_tokens = 0;                      // T
  int hidden = 0;
  int num_scales = 0;   // S (fp8 only)
  int num_topk = 0;     // K, 0 when topk_idx is not given
  int num_experts = 0;  // E, 0 when unknown (no topk, no per-expert counts)
  Config config;
  Allocator* allocator = nullptr;  // never null here
};

struct CombineArgs {
  const CombineInputs* inputs = nullptr;
  int num_tokens = 0;       // T (from the handle)
  int num_recv_tokens = 0;  // rows of x
  int hidden = 0;
  int num_topk = 0;  // K of topk_weights, 0 when not given
  Config config;
  Allocator* allocator = nullptr;
};

struct LowLatencyDispatchArgs {
  const LowLatencyDispatchInputs* inputs = nullptr;
  int num_tokens = 0;  // T
  int hidden = 0;
  int num_topk = 0;             // K
  int num_experts = 0;          // E
  int num_local_experts = 0;    // L
  int max_tokens_per_rank = 0;  // T_max
  Allocator* allocator = nullptr;
};

struct LowLatencyCombineArgs {
  const LowLatencyCombineInputs* inputs = nullptr;
  int num_tokens = 0;
  int hidden = 0;
  int num_topk = 0;
  int num_experts = 0;
  int num_local_experts = 0;
  int max_tokens_per_rank = 0;
  Allocator* allocator = nullptr;
};

// CollectiveKind (epcomm/buffer.hpp): every rank of a call carries its number and kind in what it
// exchanges with its peers.
// Normal-mode calls share one numbering, low-latency calls another (they use separate protocols).
inline bool is_low_latency(CollectiveKind kind) { return kind >= CollectiveKind::kLowLatencyDispatch; }

// What a rank that rejected a call tells its peers: the error's message without its "epcomm: <code>: "
// prefix (the peers' own error adds one).
inline std::string rejection_text(const Error& error) {
  const std::string text = error.what();
  const std::string prefix = std::string("epcomm: ") + to_string(error.code()) + ": ";
  return text.rfind(prefix, 0) == 0 ? text.substr(prefix.size()) : text;
}

// A new id for each Backend (a process-wide counter from 1): what handles carry to name their Buffer.
uint64_t next_buffer_id();

class Backend {
 public:
  Backend() : id_(next_buffer_id()) {}
  virtual ~Backend() = default;

  // Unique in the process, never reused.
  uint64_t id() const { return id_; }

  virtual const GroupGeometry& geometry() const = 0;
  virtual Device device() const = 0;
  // What this backend accepts (op_checks.cpp checks every call against it before handing it over).
  virtual const Limits& limits() const = 0;
  virtual StreamHandle comm_stream() const { return nullptr; }

  virtual LayoutResult layout(const LayoutArgs& args, const StreamOptions& stream) = 0;
  virtual DispatchResult dispatch(const DispatchArgs& args, const StreamOptions& stream) = 0;
  virtual CombineResult combine(const CombineArgs& args, const StreamOptions& stream) = 0;

  virtual LowLatencyDispatchResult low_latency_dispatch(const LowLatencyDispatchArgs& args,
                                                        const LowLatencyOptions& options) = 0;
  virtual LowLatencyCombineResult low_latency_combine(const LowLatencyCombineArgs& args,
                                                      const LowLatencyOptions& options) = 0;
  virtual TensorView next_low_latency_combine_buffer(const LowLatencyHandle& handle) = 0;
  virtual void clean_low_latency_buffer(int max_tokens_per_rank, int hidden, int num_experts, StreamHandle stream) = 0;

  virtual void update_mask(int rank, bool mask, StreamHandle stream) = 0;
  virtual TensorView query_mask() = 0;
  virtual void clean_mask(StreamHandle stream) = 0;

  virtual TensorView local_buffer(DType dtype, int64_t offset_bytes, std::optional<int64_t> num_elements,
                                  bool rdma_memory) const = 0;

  // Throws the first error that asynchronous work of this buffer recorded (waiting for that work to
  // finish first). Backends whose calls report every error before returning do nothing.
  virtual void check_errors() {}

  // Low-latency mode: [R], true where this rank sends to that peer with NVSHMEM puts.
  virtual std::vector<bool> low_latency_put_peers() const { return std::vector<bool>(geometry().num_ranks, false); }

  // The front found this rank's inputs of a collective call bad (`error`). The backend
  // still takes part in the call's exchange with a "rejected" status, so that every peer raises
  // "rank r rejected its inputs: ..." at the same call and the call numbers stay matched. Returns
  // false when this backend cannot tell its peers (the front then marks the Buffer failed, since
  // its peers may pair this rank's next call with this one). May throw a timeout.
  virtual bool reject_call(CollectiveKind kind, const Error& error) {
    (void)kind;
    (void)error;
    return false;
  }

  // The front marked the Buffer failed (`cause`): publish it so that peers waiting for this rank
  // raise kPeerFailure at once instead of timing out. Never throws.
  virtual void mark_failed(const std::string& cause) noexcept { (void)cause; }
  // A failure the backend found outside the front (e.g. in a receive hook), or "".
  virtual std::string failure() const { return {}; }

  // collective = true: synchronises with the peers before releasing (Buffer::destroy);
  // false: releases local resources only (destructor). Idempotent, never throws when !collective.
  virtual void destroy(bool collective) = 0;

 private:
  const uint64_t id_;
};

// SPEC's ranges (§1): the limits a backend starts from and narrows to its own.
Limits spec_limits();
// The limits of each backend in this build, without a Buffer; cuda_backend_limits() has
// available = false in a build without CUDA. Never throw.
Limits cpu_backend_limits();
Limits cuda_backend_limits();

// Factories; each throws Error(kUnsupported) when the backend is not compiled in.
std::unique_ptr<Backend> make_cpu_backend(Bootstrap& bootstrap, const BufferOptions& options,
                                          const GroupGeometry& geometry);
std::unique_ptr<Backend> make_cuda_backend(Bootstrap& bootstrap, const BufferOptions& options,
                                           const GroupGeometry& geometry);

}  // namespace epcomm
