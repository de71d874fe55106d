#include "cpu/cpu_backend.hpp"

#include "core/check.hpp"
#include "core/layouts.hpp"
#include "core/timeout.hpp"
#include "cpu/normal_exchange.hpp"

namespace epcomm {
namespace cpu {

namespace {
// | sync counters | normal-mode area | padding to a page | low-latency area |
size_t rdma_area_offset(const BufferOptions& options) {
  return kSyncBlockBytes + size_t(align_up(options.num_nvl_bytes, 4096));
}
}  // namespace

// The reference implements all of SPEC: its limits are SPEC's, both modes, any number of nodes
// (emulated on one machine).
Limits reference_limits() {
  Limits limits = spec_limits();
  limits.backend = BackendKind::kCpu;
  limits.available = true;
  limits.low_latency_mode = true;
  limits.normal_inter_node = true;
  limits.low_latency_inter_node = true;
  limits.use_logfmt = true;  // docs/LOGFMT.md
  return limits;
}

CpuBackend::CpuBackend(Bootstrap& bootstrap, const BufferOptions& options, const GroupGeometry& geometry)
    : geometry_(geometry),
      options_(options),
      memory_(bootstrap, rdma_area_offset(options) + size_t(options.num_rdma_bytes)),
      nvl_area_{&memory_, kSyncBlockBytes, size_t(options.num_nvl_bytes)},
      rdma_area_{&memory_, rdma_area_offset(options), size_t(options.num_rdma_bytes)},
      sync_(memory_, geometry.rank, resolve_timeout(options.timeout)),
      context_{geometry_, &options_, &sync_, id()},
      limits_(reference_limits()) {
  normal_ = std::make_unique<NormalMode>(context_, nvl_area_);
  if (options.low_latency_mode) low_latency_ = std::make_unique<LowLatencyMode>(context_, rdma_area_);
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

// The front (op_checks.cpp) rejects low-latency calls of a Buffer without low_latency_mode.
LowLatencyMode& CpuBackend::low_latency(const char* op) {
  if (!low_latency_) throw_error(ErrorCode::kInternal, concat(op, ": reached a Buffer without low-latency mode"));
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
  const Area& area = rdma_memory ? rdma_area_ : nvl_area_;
  const int64_t count =
      num_elements ? *num_elements : (int64_t(area.bytes) - offset_bytes) / int64_t(dtype_size(dtype));
  return TensorView::contiguous(area.of(geometry_.rank) + offset_bytes, dtype, {count}, Device::cpu());
}

bool CpuBackend::reject_call(CollectiveKind kind, const Error& error) {
  if (!is_low_latency(kind)) {
    normal_->reject(call_kind_of(kind), error);
  } else if (low_latency_) {
    low_latency_->reject(kind, error);
  }
  // Without low-latency mode every rank rejects its low-latency calls alike: nothing to tell.
  return true;
}

void CpuBackend::mark_failed(const std::string& cause) noexcept {
  if (!released_) sync_.mark_failed(cause);
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
  if (options_.enable_shrink && low_latency_) {
    const TensorView mask = low_latency_->query_mask();
    if (mask.data_as<const int32_t>()[geometry_.rank] != 0) return release();  // this rank left the group
    for (int r = 0; r < geometry_.num_ranks; ++r) sync_.set_masked(r, mask.data_as<const int32_t>()[r] != 0);
  }
  try {
    sync_.barrier(kLifecycleChannel, "destroy");
  } catch (...) {
    release();  // a peer that never arrives must not keep our memory mapped
    throw;
  }
  release();
}

}  // namespace cpu

Limits cpu_backend_limits() { return cpu::reference_limits(); }

std::unique_ptr<Backend> make_cpu_backend(Bootstrap& bootstrap, const BufferOptions& options,
                                          const GroupGeometry& geometry) {
  return std::make_unique<cpu::CpuBackend>(bootstrap, options, geometry);
}

}  // namespace epcomm
