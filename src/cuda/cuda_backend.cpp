#include "cuda/cuda_backend.hpp"

#include <algorithm>

#include "core/check.hpp"
#include "core/cuda_check.hpp"
#include "cuda/low_latency/ll_params.hpp"

namespace epcomm {

std::unique_ptr<Backend> make_cuda_backend(Bootstrap& bootstrap, const BufferOptions& options,
                                           const GroupGeometry& geometry) {
  return std::make_unique<cuda::CudaBackend>(bootstrap, options, geometry);
}

// What the kernels of this backend handle (see normal/protocol.hpp and low_latency/ll_params.hpp).
Limits cuda_backend_limits() {
  Limits limits = spec_limits();
  limits.backend = BackendKind::kCuda;
  limits.available = true;
  limits.low_latency_mode = cuda::low_latency_mode_built();
  limits.normal_inter_node = false;  // one NVLink domain
  limits.low_latency_inter_node = limits.low_latency_mode;
  limits.max_ranks_per_node = cuda::kMaxNvlRanks;
  limits.data_alignment_bytes = 16;  // 16-byte vector loads and stores
  limits.max_num_sms = 2 * cuda::kMaxChannels;
  limits.max_local_experts = cuda::kMaxLocalExperts;
  limits.max_low_latency_tokens_per_rank = cuda::ll::kMaxTokensPerRank;
  limits.max_low_latency_experts = cuda::ll::kMaxExperts;
  return limits;
}

namespace cuda {
namespace {

int resolve_device(int requested) {
  int count = 0;
  EPCOMM_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (requested < 0) {
    int current = 0;
    EPCOMM_CUDA_CHECK(cudaGetDevice(&current));
    return current;
  }
  require(requested < count, "Buffer", "device", "expected 0..", count - 1, ", got ", requested);
  return requested;
}

}  // namespace

CudaBackend::CudaBackend(Bootstrap& bootstrap, const BufferOptions& options, const GroupGeometry& geometry)
    : options_(options) {
  ctx_.geometry = geometry;
  ctx_.bootstrap = &bootstrap;
  ctx_.options = &options_;
  ctx_.device = resolve_device(options.device);
  ctx_.timeout = options.timeout;
  DeviceGuard guard(ctx_.device);
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&ctx_.num_device_sms, cudaDevAttrMultiProcessorCount, ctx_.device));
  limits_ = cuda_backend_limits();
  limits_.max_num_sms = std::min(limits_.max_num_sms, ctx_.num_device_sms);
  owns_comm_stream_ = options.comm_stream == nullptr;
  if (owns_comm_stream_)
    EPCOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx_.comm_stream, cudaStreamNonBlocking));
  else
    ctx_.comm_stream = reinterpret_cast<cudaStream_t>(options.comm_stream);
  try {
    errors_ = std::make_unique<DeviceErrors>(ctx_.comm_stream);
    ctx_.errors = errors_.get();
    if (options.num_nvl_bytes > 0)
      normal_memory_ = std::make_unique<NormalMemory>(bootstrap, geometry, options.num_nvl_bytes);
    normal_ = std::make_unique<NormalMode>(ctx_, normal_memory_.get(), id());
    if (options.low_latency_mode) low_latency_ = make_low_latency_mode(ctx_);
  } catch (...) {
    destroy(/*collective=*/false);
    throw;
  }
}

CudaBackend::~CudaBackend() { destroy(/*collective=*/false); }

void CudaBackend::begin_call() const { errors_->throw_if_set(); }

LayoutResult CudaBackend::layout(const LayoutArgs& args, const StreamOptions& stream) {
  DeviceGuard guard(ctx_.device);
  begin_call();
  return normal_->layout(args, stream);
}

DispatchResult CudaBackend::dispatch(const DispatchArgs& args, const StreamOptions& stream) {
  DeviceGuard guard(ctx_.device);
  begin_call();
  return normal_->dispatch(args, stream);
}

CombineResult CudaBackend::combine(const CombineArgs& args, const StreamOptions& stream) {
  DeviceGuard guard(ctx_.device);
  begin_call();
  return normal_->combine(args, stream);
}

bool CudaBackend::reject_call(CollectiveKind kind, const Error&) {
  if (!low_latency_ && is_low_latency(kind)) return true;  // no low-latency peers to mislead
  if (kind == CollectiveKind::kLowLatencyDispatch || kind == CollectiveKind::kLowLatencyCombine) {
    low_latency_->skip_call(kind == CollectiveKind::kLowLatencyDispatch);
    return true;
  }
  // clean_low_latency_buffer meets its peers in nvshmem_barrier_all: a rank that skips it alone cannot
  // tell them (they wait there); it fails its Buffer so that it at least never runs on out of step.
  if (kind == CollectiveKind::kCleanLowLatency) return false;
  if (normal_) normal_->note_rejection();
  return true;
}

// The front (op_checks.cpp) rejects low-latency calls of a Buffer without low_latency_mode.
LowLatencyMode& CudaBackend::low_latency(const char* op) const {
  if (!low_latency_) throw_error(ErrorCode::kInternal, concat(op, ": reached a Buffer without low-latency mode"));
  return *low_latency_;
}

LowLatencyDispatchResult CudaBackend::low_latency_dispatch(const LowLatencyDispatchArgs& args,
                                                           const LowLatencyOptions& options) {
  DeviceGuard guard(ctx_.device);
  begin_call();
  return low_latency("low_latency_dispatch").dispatch(args, options);
}

LowLatencyCombineResult CudaBackend::low_latency_combine(const LowLatencyCombineArgs& args,
                                                         const LowLatencyOptions& options) {
  DeviceGuard guard(ctx_.device);
  begin_call();
  return low_latency("low_latency_combine").combine(args, options);
}

TensorView CudaBackend::next_low_latency_combine_buffer(const LowLatencyHandle& handle) {
  DeviceGuard guard(ctx_.device);
  return low_latency("get_next_low_latency_combine_buffer").next_combine_buffer(handle);
}

void CudaBackend::clean_low_latency_buffer(int max_tokens_per_rank, int hidden, int num_experts, StreamHandle stream) {
  DeviceGuard guard(ctx_.device);
  begin_call();
  low_latency("clean_low_latency_buffer")
      .clean(max_tokens_per_rank, hidden, num_experts, reinterpret_cast<cudaStream_t>(stream));
}

void CudaBackend::update_mask(int rank, bool mask, StreamHandle stream) {
  DeviceGuard guard(ctx_.device);
  low_latency("low_latency_update_mask_buffer").update_mask(rank, mask, reinterpret_cast<cudaStream_t>(stream));
}

TensorView CudaBackend::query_mask() {
  DeviceGuard guard(ctx_.device);
  return low_latency("low_latency_query_mask_buffer").query_mask();
}

void CudaBackend::clean_mask(StreamHandle stream) {
  DeviceGuard guard(ctx_.device);
  low_latency("low_latency_clean_mask_buffer").clean_mask(reinterpret_cast<cudaStream_t>(stream));
}

std::vector<bool> CudaBackend::low_latency_put_peers() const {
  return low_latency_ ? low_latency_->put_peers() : Backend::low_latency_put_peers();
}

TensorView CudaBackend::local_buffer(DType dtype, int64_t offset_bytes, std::optional<int64_t> num_elements,
                                     bool rdma_memory) const {
  // A buffer without the memory asked for gives an empty view, as on the CPU backend.
  char* base = rdma_memory ? (low_latency_ ? static_cast<char*>(low_latency_->local_memory()) : nullptr)
                           : (normal_memory_ ? normal_memory_->local() : nullptr);
  const int64_t count = num_elements.value_or(0);
  // (Buffer::local_buffer bounds the view by the byte counts asked for; only num_rdma_bytes may be
  // non-zero without memory behind it: normal mode on one node allocates none.)
  require(base != nullptr || count == 0, "get_local_buffer_tensor", "use_rdma_buffer",
          "this buffer has no RDMA memory on the CUDA backend (num_rdma_bytes is allocated in low_latency_mode, "
          "or between nodes)");
  return TensorView::contiguous(base == nullptr ? nullptr : base + offset_bytes, dtype, {count}, ctx_.tensor_device());
}

void CudaBackend::check_errors() {
  DeviceGuard guard(ctx_.device);
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(ctx_.comm_stream));
  errors_->throw_if_set();
}

void CudaBackend::destroy(bool collective) {
  if (destroyed_) return;
  destroyed_ = true;
  int previous_device = -1;  // no DeviceGuard: this runs in the destructor and must not throw
  (void)cudaGetDevice(&previous_device);
  (void)cudaSetDevice(ctx_.device);
  // Our kernels end on their own (every wait is bounded), so this returns.
  if (ctx_.comm_stream != nullptr) (void)cudaStreamSynchronize(ctx_.comm_stream);
  Bootstrap* bootstrap = collective ? ctx_.bootstrap : nullptr;
  if (low_latency_) low_latency_->destroy(collective);
  low_latency_.reset();
  normal_.reset();
  if (normal_memory_) normal_memory_->release(bootstrap);
  normal_memory_.reset();
  errors_.reset();
  ctx_.errors = nullptr;
  if (ctx_.comm_stream != nullptr && owns_comm_stream_) cudaStreamDestroy(ctx_.comm_stream);
  ctx_.comm_stream = nullptr;
  if (previous_device >= 0) (void)cudaSetDevice(previous_device);
  (void)cudaGetLastError();
}

}  // namespace cuda
}  // namespace epcomm
