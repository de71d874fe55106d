// The front of every operation: resolve defaults, check arguments once, hand over to the backend.
#include "epcomm/buffer.hpp"

#include <atomic>
#include <exception>
#include <vector>

#include "core/backend.hpp"
#include "core/check.hpp"
#include "core/node_size.hpp"
#include "core/op_checks.hpp"
#include "core/timeout.hpp"

namespace epcomm {
namespace {

// The options every rank must agree on, compared across the group at construction.
struct CollectiveOptions {
  int64_t num_nvl_bytes;
  int64_t num_rdma_bytes;
  int32_t backend;
  int32_t low_latency_mode;
  int32_t ranks_per_node;
  int32_t enable_shrink;
};

void check_same_on_every_rank(Bootstrap& bootstrap, const BufferOptions& options) {
  const CollectiveOptions mine{options.num_nvl_bytes,    options.num_rdma_bytes, static_cast<int32_t>(options.backend),
                               options.low_latency_mode, options.ranks_per_node, options.enable_shrink};
  std::vector<CollectiveOptions> all(bootstrap.size());
  bootstrap.all_gather(&mine, all.data(), sizeof(mine));
  for (int r = 0; r < bootstrap.size(); ++r) {
    const CollectiveOptions& o = all[r];
    auto differs = [&](const char* name, int64_t theirs, int64_t ours) {
      require(theirs == ours, "Buffer", name, "must be the same on every rank: rank ", r, " passed ", theirs, ", rank ",
              bootstrap.rank(), " passed ", ours);
    };
    differs("num_nvl_bytes", o.num_nvl_bytes, mine.num_nvl_bytes);
    differs("num_rdma_bytes", o.num_rdma_bytes, mine.num_rdma_bytes);
    differs("backend", o.backend, mine.backend);
    differs("low_latency_mode", o.low_latency_mode, mine.low_latency_mode);
    differs("ranks_per_node", o.ranks_per_node, mine.ranks_per_node);
    differs("enable_shrink", o.enable_shrink, mine.enable_shrink);
  }
}

}  // namespace

const char* to_string(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kDispatch:
      return "dispatch";
    case CollectiveKind::kCachedDispatch:
      return "cached dispatch";
    case CollectiveKind::kCombine:
      return "combine";
    case CollectiveKind::kLowLatencyDispatch:
      return "low_latency_dispatch";
    case CollectiveKind::kLowLatencyCombine:
      return "low_latency_combine";
    case CollectiveKind::kCleanLowLatency:
      return "clean_low_latency_buffer";
  }
  return "an unknown call";
}

uint64_t next_buffer_id() {
  static std::atomic<uint64_t> last{0};
  return ++last;
}

const char* to_string(BackendKind kind) { return kind == BackendKind::kCpu ? "cpu" : "cuda"; }

bool backend_available(BackendKind kind) {
#if EPCOMM_WITH_CUDA
  (void)kind;
  return true;
#else
  return kind == BackendKind::kCpu;
#endif
}

Buffer::Buffer(Bootstrap& bootstrap, const BufferOptions& options) : options_(options) {
  options_.ranks_per_node = resolve_ranks_per_node(options.ranks_per_node, bootstrap.size());
  const GroupGeometry geometry =
      check_buffer_options(backend_limits(options.backend), options_, bootstrap.rank(), bootstrap.size());
  options_.timeout = resolve_timeout(options.timeout);
  check_same_on_every_rank(bootstrap, options_);
  backend_ = options_.backend == BackendKind::kCpu ? make_cpu_backend(bootstrap, options_, geometry)
                                                   : make_cuda_backend(bootstrap, options_, geometry);
}

Buffer::~Buffer() {
  if (backend_) backend_->destroy(/*collective=*/false);
}

void Buffer::destroy() {
  if (!backend_) return;
  backend_->destroy(/*collective=*/true);
  backend_.reset();
}

Backend& Buffer::live_backend(const char* operation) const {
  if (!backend_) throw_error(ErrorCode::kInvalidArgument, concat(operation, ": the Buffer was destroyed"));
  return *backend_;
}

Backend& Buffer::usable_backend(const char* operation) const {
  Backend& backend = live_backend(operation);
  if (failure_.empty()) failure_ = backend.failure();  // e.g. a receive hook that timed out
  if (!failure_.empty())
    throw_error(ErrorCode::kBufferFailed,
                concat(operation, ": the Buffer failed in an earlier call and can only be destroyed (a new Buffer ",
                       "then works); first cause: ", failure_));
  return backend;
}

std::string Buffer::failure() const {
  if (failure_.empty() && backend_) failure_ = backend_->failure();
  return failure_;
}

void Buffer::mark_failed(const std::string& cause) {
  if (!failure_.empty()) return;  // the first cause is the one worth naming
  failure_ = cause;
  if (backend_) backend_->mark_failed(cause);
}

// Input errors leave the Buffer usable (every rank of the call raised them); anything that may have
// left the peers and this rank at different points of the protocol does not.
void Buffer::note_failure(const char* operation, const Error& error) {
  const ErrorCode code = error.code();
  if (code == ErrorCode::kTimeout || code == ErrorCode::kPeerFailure || code == ErrorCode::kInternal)
    mark_failed(concat("rank ", backend_ ? backend_->geometry().rank : -1, " in ", operation, ": ", error.what()));
}

template <class Work>
auto Buffer::guarded(const char* operation, Work&& work) {
  Backend& backend = usable_backend(operation);
  try {
    return work(backend);
  } catch (const Error& error) {
    note_failure(operation, error);
    throw;
  } catch (const std::exception& error) {
    // Not epcomm's (e.g. the caller's allocator ran out of memory): the call may have stopped between
    // two steps of the protocol, so this rank can no longer be trusted to be in step with its peers.
    mark_failed(concat("rank ", backend.geometry().rank, " in ", operation, ": ", error.what()));
    throw;
  }
}

void Buffer::reject(Backend& backend, CollectiveKind kind, const Error& error) {
  bool told = false;
  try {
    told = backend.reject_call(kind, error);
  } catch (const Error& lost) {
    note_failure(to_string(kind), lost);  // e.g. a peer never came to the call: the user still sees `error`
    return;
  }
  if (!told && backend.geometry().num_ranks > 1)
    mark_failed(concat("rank ", backend.geometry().rank, " rejected its inputs of ", to_string(kind), " (",
                       error.what(), ") and this backend cannot yet tell its peers within the call, so they could ",
                       "pair its next call with this one"));
}

template <class Check>
auto Buffer::checked(Backend& backend, CollectiveKind kind, Check&& check) {
  try {
    return check();
  } catch (const Error& error) {
    reject(backend, kind, error);
    throw;
  }
}

int Buffer::rank() const { return live_backend("rank").geometry().rank; }
int Buffer::num_ranks() const { return live_backend("num_ranks").geometry().num_ranks; }
int Buffer::ranks_per_node() const { return live_backend("ranks_per_node").geometry().ranks_per_node; }
const BufferOptions& Buffer::options() const { return options_; }
Device Buffer::device() const { return live_backend("device").device(); }
StreamHandle Buffer::comm_stream() const { return live_backend("comm_stream").comm_stream(); }
const Limits& Buffer::limits() const { return live_backend("limits").limits(); }

namespace {
CheckContext context_of(const Backend& backend, const BufferOptions& options) {
  return CheckContext{backend.geometry(), backend.limits(), backend.device(), backend.id(), options};
}
}  // namespace

LayoutResult Buffer::get_dispatch_layout(const TensorView& topk_idx, int num_experts, const StreamOptions& stream) {
  // Local (no peer is involved): its input errors are this rank's only.
  return guarded("get_dispatch_layout", [&](Backend& backend) {
    const LayoutArgs args = check_layout(context_of(backend, options_), topk_idx, num_experts);
    return backend.layout(args, stream);
  });
}

DispatchResult Buffer::dispatch(const DispatchInputs& inputs, const StreamOptions& stream) {
  const CollectiveKind kind = inputs.handle ? CollectiveKind::kCachedDispatch : CollectiveKind::kDispatch;
  return guarded("dispatch", [&](Backend& backend) {
    DispatchArgs args = checked(backend, kind, [&] { return check_dispatch(context_of(backend, options_), inputs); });
    args.allocator = stream.allocator ? stream.allocator : &default_allocator();
    return backend.dispatch(args, stream);
  });
}

CombineResult Buffer::combine(const CombineInputs& inputs, const StreamOptions& stream) {
  return guarded("combine", [&](Backend& backend) {
    CombineArgs args = checked(backend, CollectiveKind::kCombine,
                               [&] { return check_combine(context_of(backend, options_), inputs); });
    args.allocator = stream.allocator ? stream.allocator : &default_allocator();
    return backend.combine(args, stream);
  });
}

void Buffer::check_errors() {
  guarded("check_errors", [&](Backend& backend) { backend.check_errors(); });
}

LowLatencyDispatchResult Buffer::low_latency_dispatch(const LowLatencyDispatchInputs& inputs,
                                                      const LowLatencyOptions& options) {
  return guarded("low_latency_dispatch", [&](Backend& backend) {
    LowLatencyDispatchArgs args = checked(backend, CollectiveKind::kLowLatencyDispatch, [&] {
      return check_low_latency_dispatch(context_of(backend, options_), inputs, options);
    });
    args.allocator = options.allocator ? options.allocator : &default_allocator();
    LowLatencyDispatchResult result = backend.low_latency_dispatch(args, options);
    result.handle.buffer_id = backend.id();
    return result;
  });
}

LowLatencyCombineResult Buffer::low_latency_combine(const LowLatencyCombineInputs& inputs,
                                                    const LowLatencyOptions& options) {
  return guarded("low_latency_combine", [&](Backend& backend) {
    LowLatencyCombineArgs args = checked(backend, CollectiveKind::kLowLatencyCombine, [&] {
      return check_low_latency_combine(context_of(backend, options_), inputs, options);
    });
    args.allocator = options.allocator ? options.allocator : &default_allocator();
    return backend.low_latency_combine(args, options);
  });
}

TensorView Buffer::next_low_latency_combine_buffer(const LowLatencyHandle& handle) {
  return guarded("get_next_low_latency_combine_buffer", [&](Backend& backend) {
    check_next_low_latency_combine_buffer(context_of(backend, options_), handle);
    return backend.next_low_latency_combine_buffer(handle);
  });
}

void Buffer::clean_low_latency_buffer(int max_tokens_per_rank, int hidden, int num_experts, StreamHandle stream) {
  guarded("clean_low_latency_buffer", [&](Backend& backend) {
    checked(backend, CollectiveKind::kCleanLowLatency, [&] {
      check_clean_low_latency_buffer(context_of(backend, options_), max_tokens_per_rank, hidden, num_experts);
    });
    backend.clean_low_latency_buffer(max_tokens_per_rank, hidden, num_experts, stream);
  });
}

void Buffer::reject_inputs(CollectiveKind kind, const Error& error) {
  guarded(to_string(kind), [&](Backend& backend) { reject(backend, kind, error); });
}

void Buffer::low_latency_update_mask_buffer(int rank, bool mask, StreamHandle stream) {
  guarded("low_latency_update_mask_buffer", [&](Backend& backend) {
    check_mask_call(context_of(backend, options_), "low_latency_update_mask_buffer", rank);
    backend.update_mask(rank, mask, stream);
  });
}

TensorView Buffer::low_latency_query_mask_buffer() {
  return guarded("low_latency_query_mask_buffer", [&](Backend& backend) {
    check_mask_call(context_of(backend, options_), "low_latency_query_mask_buffer");
    return backend.query_mask();
  });
}

void Buffer::low_latency_clean_mask_buffer(StreamHandle stream) {
  guarded("low_latency_clean_mask_buffer", [&](Backend& backend) {
    check_mask_call(context_of(backend, options_), "low_latency_clean_mask_buffer");
    backend.clean_mask(stream);
  });
}

std::vector<bool> Buffer::low_latency_put_peers() const {
  return live_backend("low_latency_put_peers").low_latency_put_peers();
}

TensorView Buffer::local_buffer(DType dtype, int64_t offset_bytes, std::optional<int64_t> num_elements,
                                bool rdma_memory) const {
  const Backend& backend = usable_backend("get_local_buffer_tensor");
  const int64_t count =
      check_local_buffer(context_of(backend, options_), dtype, offset_bytes, num_elements, rdma_memory);
  return backend.local_buffer(dtype, offset_bytes, count, rdma_memory);
}

}  // namespace epcomm
