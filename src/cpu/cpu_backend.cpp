#include "cpu/cpu_backend.hpp"

#include "core/check.hpp"
#include "core/timeout.hpp"

namespace epcomm {
namespace cpu {

CpuBackend::CpuBackend(Bootstrap& bootstrap, const BufferOptions& options, const GroupGeometry& geometry)
    : geometry_(geometry),
      options_(options),
      memory_(bootstrap, kSyncBlockBytes + size_t(options.num_nvl_bytes) + size_t(options.num_rdma_bytes)),
      sync_(memory_, geometry.rank, resolve_timeout(options.timeout)),
      context_{geometry_, &options_, &sync_, this} {
  const size_t nvl_bytes = size_t(options.num_nvl_bytes);
  normal_ = std::make_unique<NormalMode>(context_, Area{&memory_, kSyncBlockBytes, nvl_bytes});
  if (options.low_latency_mode)
    low_latency_ = std::make_unique<LowLatencyMode>(
        context_, Area{&memory_, kSyncBlockBytes + nvl_bytes, size_t(options.num_rdma_bytes)});
}

CpuBackend::~CpuBackend() { release(); }

LayoutResult CpuBackend::layout(const LayoutArgs& args, const StreamOptions& stream) {
  Allocator& allocator = stream.allocator ? *stream.allocator : default_allocator();
  return normal_->layout(args, allocator, stream.stream);
}

DispatchResult CpuBackend::dispatch(const DispatchArgs& args, const StreamOptions& stream) {
  return normal_->dispatch(args, stream.stream);
}

CombineResult CpuBackend::combine(const CombineArgs& args, const StreamOptions& stream) {
  return normal_->combine(args, stream.stream);
}

LowLatencyMode& CpuBackend::low_latency(const char* op) {
  if (!low_latency_)
    throw_error(ErrorCode::kInvalidArgument, concat(op, ": Buffer: was not created with low_latency_mode=True"));
  return *low_latency_;
}

LowLatencyDispatchResult CpuBackend::low_latency_dispatch(const LowLatencyDispatchArgs& args,
                                                          const LowLatencyOptions& options) {
  return low_latency("low_latency_dispatch").dispatch(args, options);
}

LowLatencyCombineResult CpuBackend::low_latency_combine(const LowLatencyCombineArgs& args,
                                                        const LowLatencyOptions& options) {
  return low_latency("low_latency_combine").combine(args, options);
}

TensorView CpuBackend::next_low_latency_combine_buffer(const LowLatencyHandle& handle) {
  return low_latency("get_next_low_latency_combine_buffer").next_combine_buffer(handle);
}

void CpuBackend::clean_low_latency_buffer(int max_tokens_per_rank, int hidden, int num_experts, StreamHandle) {
  low_latency("clean_low_latency_buffer").clean(max_tokens_per_rank, hidden, num_experts);
}

void CpuBackend::update_mask(int rank, bool mask, StreamHandle) {
  low_latency("low_latency_update_mask_buffer").update_mask(rank, mask);
}

TensorView CpuBackend::query_mask() { return low_latency("low_latency_query_mask_buffer").query_mask(); }

void CpuBackend::clean_mask(StreamHandle) { low_latency("low_latency_clean_mask_buffer").clean_mask(); }

TensorView CpuBackend::local_buffer(DType dtype, int64_t offset_bytes, std::optional<int64_t> num_elements,
                                    bool rdma_memory) const {
  const int64_t area_offset = int64_t(kSyncBlockBytes) + (rdma_memory ? options_.num_nvl_bytes : 0);
  const int64_t area_bytes = rdma_memory ? options_.num_rdma_bytes : options_.num_nvl_bytes;
  const int64_t count = num_elements ? *num_elements : (area_bytes - offset_bytes) / int64_t(dtype_size(dtype));
  return TensorView::contiguous(memory_.local() + area_offset + offset_bytes, dtype, {count}, Device::cpu());
}

void CpuBackend::release() noexcept {
  if (released_) return;
  released_ = true;
  low_latency_.reset();
  normal_.reset();
  memory_.release();
}

void CpuBackend::destroy(bool collective) {
  if (released_) return;
  if (!collective) return release();
  try {
    sync_.barrier(kLifecycleChannel, "destroy");
  } catch (...) {
    release();  // a peer that never arrives must not keep our memory mapped
    throw;
  }
  release();
}

}  // namespace cpu

std::unique_ptr<Backend> make_cpu_backend(Bootstrap& bootstrap, const BufferOptions& options,
                                          const GroupGeometry& geometry) {
  return std::make_unique<cpu::CpuBackend>(bootstrap, options, geometry);
}

}  // namespace epcomm
