// Low-latency mode over NVSHMEM: owns the symmetric memory, the call parities, the outputs, and
// launches the kernels of dispatch.cu / combine.cu. See ll_params.hpp for the control region.
//
// Calls alternate between two parity blocks of the symmetric memory (dispatch and combine count
// separately), so a call's data stays in place until the call after next. Flags and counters are
// cleared by the kernels that consume them: nothing depends on a host-side call count, and a
// captured CUDA graph can be replayed any number of times.
#include "cuda/low_latency/low_latency_mode.hpp"

#include <array>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "core/cuda_check.hpp"
#include "core/layouts.hpp"
#include "cuda/low_latency/ll_params.hpp"
#include "cuda/low_latency/nvshmem_runtime.hpp"

namespace epcomm::cuda {
namespace {

using ll::ControlLayout;
using ll::LocalControlLayout;

// What combine needs to know about one of the last two dispatches.
struct DispatchRecord {
  const void* src_info = nullptr;  // identifies the handle
  int max_tokens = 0;
  int hidden = 0;
  int num_experts = 0;
};

Tensor allocate(Allocator& allocator, DType dtype, std::initializer_list<int64_t> shape, Device device,
                cudaStream_t stream) {
  return allocator.allocate(dtype, std::span<const int64_t>(shape.begin(), shape.size()), device, stream);
}

void require_aligned(const void* pointer, const char* op, const char* arg) {
  require(reinterpret_cast<uintptr_t>(pointer) % 16 == 0, op, arg,
          "data must be 16-byte aligned for vector access, got address ", pointer);
}

// cudaMalloc that also works while the calling thread captures a CUDA graph (the allocation is not
// part of the graph).
void* malloc_outside_capture(int64_t bytes) {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  EPCOMM_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  void* pointer = nullptr;
  const cudaError_t status = cudaMalloc(&pointer, static_cast<size_t>(bytes));
  cudaThreadExchangeStreamCaptureMode(&mode);
  EPCOMM_CUDA_CHECK(status);
  return pointer;
}

class NvshmemLowLatencyMode final : public LowLatencyMode {
 public:
  explicit NvshmemLowLatencyMode(const CudaContext& ctx);
  ~NvshmemLowLatencyMode() override { destroy(/*collective=*/false); }

  LowLatencyDispatchResult dispatch(const LowLatencyDispatchArgs& args, const LowLatencyOptions& options) override;
  LowLatencyCombineResult combine(const LowLatencyCombineArgs& args, const LowLatencyOptions& options) override;
  TensorView next_combine_buffer(const LowLatencyHandle& handle) override;
  void clean(int max_tokens_per_rank, int hidden, int num_experts, cudaStream_t stream) override;
  void update_mask(int rank, bool mask, cudaStream_t stream) override;
  TensorView query_mask() override;
  void clean_mask(cudaStream_t stream) override;
  void* local_memory() const override { return symmetric_; }
  void destroy(bool collective) override;

 private:
  LowLatencyLayout layout(int max_tokens, int hidden, int num_experts) const {
    return LowLatencyLayout{max_tokens, hidden, geometry_.num_ranks, num_experts, symmetric_bytes_};
  }
  uint8_t* control(int64_t offset) const { return symmetric_ + offset; }
  uint64_t* peer_bases() const { return reinterpret_cast<uint64_t*>(local_control_ + LocalControlLayout::kPeerBases); }
  int32_t* mask() const { return reinterpret_cast<int32_t*>(local_control_ + LocalControlLayout::kMask); }
  ll::Common common() const;
  void check_usable(const char* op);
  void check_limits(int max_tokens, int hidden, int num_experts, const char* op) const;
  int find_dispatch(const LowLatencyHandle& handle) const;
  uint16_t* ensure_zero_copy(int64_t bytes);

  GroupGeometry geometry_;
  int device_ = 0;
  int num_sms_ = 0;
  uint64_t timeout_ns_ = 0;
  bool shrink_ = false;
  bool overlap_send_ = true;  // receive kernels as programmatic dependents ($EPCOMM_LL_PDL=0: off)
  // A dispatch receive overlaps its send only up to this many tokens per rank: beyond, the send is
  // bandwidth-bound and the early receive blocks slow it down more than the launch gap they save
  // (bench/results/NOTES.md; $EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS overrides).
  int dispatch_overlap_max_tokens_ = kDefaultDispatchOverlapMaxTokens;
  static constexpr int kDefaultDispatchOverlapMaxTokens = 64;
  DeviceErrors* errors_ = nullptr;

  uint8_t* symmetric_ = nullptr;
  int64_t symmetric_bytes_ = 0;
  uint8_t* local_control_ = nullptr;  // LocalControlLayout, outside what get_local_buffer_tensor views
  bool has_put_peers_ = false;

  int dispatch_parity_ = 0;  // parity of the next dispatch
  int combine_parity_ = 0;
  std::array<DispatchRecord, 2> dispatches_{};

  // Zero-copy / staging region [L, R x T_max, hidden] bf16 (LowLatencyLayout::zero_copy_bytes).
  void* zero_copy_ = nullptr;
  int64_t zero_copy_bytes_ = 0;
  std::vector<void*> old_zero_copy_;  // outgrown regions, freed by destroy (kernels may still read them)

  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // hooks check it
  bool destroyed_ = false;
};

NvshmemLowLatencyMode::NvshmemLowLatencyMode(const CudaContext& ctx)
    : geometry_(ctx.geometry),
      device_(ctx.device),
      num_sms_(ctx.num_device_sms),
      timeout_ns_(ctx.timeout_ns()),
      shrink_(ctx.options->enable_shrink),
      errors_(ctx.errors) {
  const int64_t bytes = ctx.options->num_rdma_bytes;
  require(bytes >= kLowLatencyControlBytes, "Buffer", "num_rdma_bytes", "low-latency mode needs at least ",
          kLowLatencyControlBytes, " bytes (see get_low_latency_rdma_size_hint), got ", bytes);
  const char* pdl = std::getenv("EPCOMM_LL_PDL");
  overlap_send_ = pdl == nullptr || std::string(pdl) != "0";
  if (const char* limit = std::getenv("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS"))
    dispatch_overlap_max_tokens_ = std::atoi(limit);
  DeviceGuard guard(device_);
  ll::ensure_nvshmem(*ctx.bootstrap, device_, bytes, geometry_.num_nodes() == 1);
  symmetric_ = static_cast<uint8_t*>(ll::allocate_symmetric(bytes));
  symmetric_bytes_ = bytes;
  EPCOMM_CUDA_CHECK(cudaMemset(symmetric_, 0, static_cast<size_t>(bytes)));
  local_control_ = static_cast<uint8_t*>(malloc_outside_capture(LocalControlLayout::kEnd));
  EPCOMM_CUDA_CHECK(cudaMemset(local_control_, 0, static_cast<size_t>(LocalControlLayout::kEnd)));

  std::vector<uint64_t> peers(geometry_.num_ranks);
  for (int r = 0; r < geometry_.num_ranks; ++r) {
    peers[r] = reinterpret_cast<uint64_t>(ll::peer_pointer(symmetric_, r));
    has_put_peers_ |= peers[r] == 0;
  }
  EPCOMM_CUDA_CHECK(cudaMemcpy(peer_bases(), peers.data(), peers.size() * sizeof(uint64_t), cudaMemcpyHostToDevice));
  int max_smem = 0;
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
  ll::prepare_dispatch_kernels(max_smem);
  ll::prepare_combine_kernels(max_smem);
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  ll::nvshmem_group_barrier();  // every rank's flags are zero before anyone sends
}

ll::Common NvshmemLowLatencyMode::common() const {
  ll::Common c;
  c.local = symmetric_;
  c.peer_bases = peer_bases();
  c.mask = mask();
  c.counters = reinterpret_cast<uint32_t*>(control(ControlLayout::kCounters));
  c.errors = errors_->sink();
  c.timeout_ns = timeout_ns_;
  c.rank = geometry_.rank;
  c.num_ranks = geometry_.num_ranks;
  c.shrink = shrink_ ? 1 : 0;
  c.has_put_peers = has_put_peers_ ? 1 : 0;
  return c;
}

// Reports an error a kernel of an earlier call recorded (the word is host memory: no sync).
void NvshmemLowLatencyMode::check_usable(const char* op) {
  if (destroyed_) throw_error(ErrorCode::kInvalidArgument, concat(op, ": the Buffer was destroyed"));
  errors_->throw_if_set();  // timeouts stay set; other errors are re-armed by DeviceErrors
}

void NvshmemLowLatencyMode::check_limits(int max_tokens, int hidden, int num_experts, const char* op) const {
  if (max_tokens > ll::kMaxTokensPerRank)
    throw_error(ErrorCode::kUnsupported,
                concat(op, ": num_max_dispatch_tokens_per_rank = ", max_tokens,
                       " is not supported yet by the CUDA backend (at most ", ll::kMaxTokensPerRank, ")"));
  if (num_experts > ll::kMaxExperts)
    throw_error(ErrorCode::kUnsupported,
                concat(op, ": num_experts = ", num_experts, " is not supported yet by the CUDA backend (at most ",
                       ll::kMaxExperts, ")"));
  const int64_t needed = layout(max_tokens, hidden, num_experts).total_bytes();
  if (needed > symmetric_bytes_)
    throw_error(ErrorCode::kOutOfCapacity,
                concat(op, ": num_rdma_bytes: the buffer has ", symmetric_bytes_, " bytes, these sizes need ", needed));
}

LowLatencyDispatchResult NvshmemLowLatencyMode::dispatch(const LowLatencyDispatchArgs& args,
                                                         const LowLatencyOptions& options) {
  const char* op = "low_latency_dispatch";
  check_usable(op);
  DeviceGuard guard(device_);
  const LowLatencyDispatchInputs& in = *args.inputs;
  const int T = args.num_tokens, T_max = args.max_tokens_per_rank, hidden = args.hidden;
  const int L = args.num_local_experts, R = geometry_.num_ranks;
  check_limits(T_max, hidden, args.num_experts, op);
  require_aligned(in.x.data, op, "x");
  const LowLatencyLayout lay = layout(T_max, hidden, args.num_experts);
  const int64_t N = lay.num_rows();
  const int parity = dispatch_parity_;
  cudaStream_t stream = options.stream;
  Allocator& allocator = *args.allocator;
  const Device device = Device::cuda(device_);

  LowLatencyDispatchResult result;
  result.recv_x =
      allocate(allocator, in.use_fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, {L, N, hidden}, device, stream);
  ll::Format format = ll::Format::kBf16;
  if (in.use_fp8) {
    format = in.use_ue8m0 ? ll::Format::kFp8Ue8m0 : in.round_scale ? ll::Format::kFp8RoundScale : ll::Format::kFp8;
    const int64_t columns = in.use_ue8m0 ? hidden / 512 : hidden / 128;
    // Column-major in the last two dimensions: allocated [L, S, N], returned as its transpose.
    Tensor scales =
        allocate(allocator, in.use_ue8m0 ? DType::kInt32 : DType::kFloat32, {L, columns, N}, device, stream);
    result.recv_x_scales = scales.with_view(scales.transposed(1, 2));
  }
  result.recv_count = allocate(allocator, DType::kInt32, {L}, device, stream);
  result.handle.src_info = allocate(allocator, DType::kInt32, {L, N}, device, stream);
  result.handle.layout_range = allocate(allocator, DType::kInt64, {L, R}, device, stream);
  result.handle.num_max_dispatch_tokens_per_rank = T_max;
  result.handle.hidden = hidden;
  result.handle.num_experts = args.num_experts;

  ll::DispatchParams p;
  p.c = common();
  p.parity = parity;
  p.x = in.x.data_as<const uint16_t>();
  p.topk_idx = in.topk_idx.data;
  p.topk_is_int64 = in.topk_idx.dtype == DType::kInt64 ? 1 : 0;
  p.num_tokens = T;
  p.hidden = hidden;
  p.num_topk = args.num_topk;
  p.num_experts = args.num_experts;
  p.num_local_experts = L;
  p.max_tokens = T_max;
  p.format = format;
  p.recv_offset = lay.dispatch_recv_offset(parity);
  p.meta_offset = lay.dispatch_meta_offset(parity);
  p.messages_offset = lay.dispatch_messages_offset(parity);
  p.staging_offset = lay.staging_offset(parity);
  p.slot_bytes = lay.dispatch_slot_bytes();
  p.message_bytes = lay.dispatch_message_bytes();
  p.recv_x = result.recv_x.data;
  p.recv_scales = result.recv_x_scales ? result.recv_x_scales->data : nullptr;
  p.recv_count = result.recv_count.data_as<int32_t>();
  p.src_info = result.handle.src_info.data_as<int32_t>();
  p.layout_range = result.handle.layout_range.data_as<int64_t>();
  p.cumulative_recv_stats =
      in.cumulative_local_expert_recv_stats ? in.cumulative_local_expert_recv_stats->data_as<int32_t>() : nullptr;
  p.wait_stats = in.dispatch_wait_recv_cost_stats ? in.dispatch_wait_recv_cost_stats->data_as<int64_t>() : nullptr;

  ll::launch_dispatch_send(p, num_sms_, stream);
  if (options.return_recv_hook) {
    const int num_sms = num_sms_, device_index = device_;
    std::vector<Tensor> keep = {result.recv_x, result.recv_count, result.handle.src_info, result.handle.layout_range};
    if (result.recv_x_scales) keep.push_back(*result.recv_x_scales);
    result.hook = RecvHook([alive = alive_, p, num_sms, device_index, keep](StreamHandle hook_stream) {
      if (!*alive) throw_error(ErrorCode::kInvalidArgument, "low_latency_dispatch recv hook: the Buffer was destroyed");
      DeviceGuard hook_guard(device_index);
      ll::launch_dispatch_recv(p, num_sms, hook_stream, /*overlap_send=*/false);
    });
  } else {
    ll::launch_dispatch_recv(p, num_sms_, stream, overlap_send_ && T <= dispatch_overlap_max_tokens_);
    if (options.async_finish) result.event = Event::record(stream);
  }
  dispatches_[parity] = DispatchRecord{result.handle.src_info.data, T_max, hidden, args.num_experts};
  dispatch_parity_ ^= 1;
  return result;
}

// The parity of the dispatch that made `handle`: one of the last two dispatches.
int NvshmemLowLatencyMode::find_dispatch(const LowLatencyHandle& handle) const {
  const int newest = dispatch_parity_ ^ 1;
  for (int parity : {newest, newest ^ 1}) {
    const DispatchRecord& d = dispatches_[parity];
    if (d.src_info != nullptr && d.src_info == handle.src_info.data &&
        d.max_tokens == handle.num_max_dispatch_tokens_per_rank && d.hidden == handle.hidden &&
        d.num_experts == handle.num_experts)
      return parity;
  }
  throw_error(ErrorCode::kInvalidArgument,
              "low_latency_combine: handle: is older than the last two low-latency dispatches (or comes from "
              "another Buffer); a handle is usable until the second-next dispatch");
}

LowLatencyCombineResult NvshmemLowLatencyMode::combine(const LowLatencyCombineArgs& args,
                                                       const LowLatencyOptions& options) {
  const char* op = "low_latency_combine";
  check_usable(op);
  DeviceGuard guard(device_);
  const LowLatencyCombineInputs& in = *args.inputs;
  const LowLatencyHandle& handle = *in.handle;
  const int dispatch_parity = find_dispatch(handle);
  const int T_max = args.max_tokens_per_rank, hidden = args.hidden;
  check_limits(T_max, hidden, args.num_experts, op);
  const LowLatencyLayout lay = layout(T_max, hidden, args.num_experts);
  cudaStream_t stream = options.stream;
  const int parity = combine_parity_;

  LowLatencyCombineResult result;
  if (in.out) {
    result.combined_x = Tensor::borrowed(*in.out);
  } else {
    result.combined_x =
        allocate(*args.allocator, DType::kBFloat16, {args.num_tokens, hidden}, Device::cuda(device_), stream);
  }
  require_aligned(result.combined_x.data, op, "out");

  ll::CombineParams p;
  p.c = common();
  p.parity = parity;
  if (in.zero_copy) {
    require(zero_copy_ != nullptr && zero_copy_bytes_ >= lay.zero_copy_bytes(), op, "zero_copy",
            "is True but get_next_low_latency_combine_buffer(handle) was not called for a dispatch of this shape");
    p.x = static_cast<const uint16_t*>(zero_copy_);
    p.x_is_staging = 1;
  } else {
    require_aligned(in.x.data, op, "x");
    p.x = in.x.data_as<const uint16_t>();
  }
  p.staging = has_put_peers_ ? ensure_zero_copy(lay.zero_copy_bytes()) : nullptr;
  p.src_info = handle.src_info.data_as<const int32_t>();
  p.layout_range = handle.layout_range.data_as<const int64_t>();
  p.meta = symmetric_ + lay.dispatch_meta_offset(dispatch_parity);
  p.topk_idx = in.topk_idx.data;
  p.topk_is_int64 = in.topk_idx.dtype == DType::kInt64 ? 1 : 0;
  p.topk_weights = in.topk_weights.data_as<const float>();
  p.out = result.combined_x.data_as<uint16_t>();
  p.wait_stats = in.combine_wait_recv_cost_stats ? in.combine_wait_recv_cost_stats->data_as<int64_t>() : nullptr;
  p.num_tokens = args.num_tokens;
  p.hidden = hidden;
  p.num_topk = args.num_topk;
  p.num_experts = args.num_experts;
  p.num_local_experts = args.num_local_experts;
  p.max_tokens = T_max;
  p.recv_offset = lay.combine_recv_offset(parity);

  ll::launch_combine_send(p, num_sms_, stream);
  if (options.return_recv_hook) {
    const int num_sms = num_sms_, device_index = device_;
    Tensor keep = result.combined_x;
    result.hook = RecvHook([alive = alive_, p, num_sms, device_index, keep](StreamHandle hook_stream) {
      if (!*alive) throw_error(ErrorCode::kInvalidArgument, "low_latency_combine recv hook: the Buffer was destroyed");
      DeviceGuard hook_guard(device_index);
      ll::launch_combine_recv(p, num_sms, hook_stream, /*overlap_send=*/false);
    });
  } else {
    ll::launch_combine_recv(p, num_sms_, stream, overlap_send_);
    if (options.async_finish) result.event = Event::record(stream);
  }
  combine_parity_ ^= 1;
  return result;
}

uint16_t* NvshmemLowLatencyMode::ensure_zero_copy(int64_t bytes) {
  if (zero_copy_ != nullptr && zero_copy_bytes_ >= bytes) return static_cast<uint16_t*>(zero_copy_);
  if (zero_copy_ != nullptr) old_zero_copy_.push_back(zero_copy_);
  zero_copy_ = nullptr;
  zero_copy_bytes_ = 0;
  void* region = malloc_outside_capture(bytes);
  if (has_put_peers_) {
    try {
      ll::register_local_buffer(region, bytes);
    } catch (...) {
      cudaFree(region);
      throw;
    }
  }
  zero_copy_ = region;
  zero_copy_bytes_ = bytes;
  return static_cast<uint16_t*>(zero_copy_);
}

TensorView NvshmemLowLatencyMode::next_combine_buffer(const LowLatencyHandle& handle) {
  check_usable("get_next_low_latency_combine_buffer");
  DeviceGuard guard(device_);
  const LowLatencyLayout lay = layout(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts);
  void* region = ensure_zero_copy(lay.zero_copy_bytes());
  return TensorView::contiguous(region, DType::kBFloat16,
                                {lay.num_local_experts(), lay.num_rows(), int64_t(handle.hidden)},
                                Device::cuda(device_));
}

// Collective and host-synchronous: after it no flag, counter or parity remembers earlier calls.
void NvshmemLowLatencyMode::clean(int max_tokens_per_rank, int hidden, int num_experts, cudaStream_t stream) {
  check_usable("clean_low_latency_buffer");
  check_limits(max_tokens_per_rank, hidden, num_experts, "clean_low_latency_buffer");
  DeviceGuard guard(device_);
  EPCOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  ll::nvshmem_group_barrier();  // nobody writes into our memory any more
  EPCOMM_CUDA_CHECK(cudaMemset(symmetric_, 0, static_cast<size_t>(ControlLayout::kResetEnd)));
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  dispatch_parity_ = 0;
  combine_parity_ = 0;
  dispatches_ = {};
  ll::nvshmem_group_barrier();  // nobody sends before everybody is clean
}

void NvshmemLowLatencyMode::update_mask(int rank, bool value, cudaStream_t stream) {
  check_usable("low_latency_update_mask_buffer");
  DeviceGuard guard(device_);
  ll::launch_set_mask(mask(), rank, value ? 1 : 0, stream);
}

TensorView NvshmemLowLatencyMode::query_mask() {
  check_usable("low_latency_query_mask_buffer");
  return TensorView::contiguous(mask(), DType::kInt32, {int64_t(geometry_.num_ranks)}, Device::cuda(device_));
}

void NvshmemLowLatencyMode::clean_mask(cudaStream_t stream) {
  check_usable("low_latency_clean_mask_buffer");
  DeviceGuard guard(device_);
  EPCOMM_CUDA_CHECK(cudaMemsetAsync(mask(), 0, sizeof(int32_t) * geometry_.num_ranks, stream));
}

// Collective: frees the symmetric memory (nvshmem_free synchronises all PEs). Not collective (a
// destructor without destroy()): only local memory is freed; the symmetric block stays allocated
// until the process ends, because freeing it would wait for the peers.
void NvshmemLowLatencyMode::destroy(bool collective) {
  if (destroyed_) return;
  destroyed_ = true;
  *alive_ = false;
  try {
    DeviceGuard guard(device_);
    EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
    if (collective) {
      ll::free_symmetric(symmetric_);
      symmetric_ = nullptr;
    }
    old_zero_copy_.push_back(zero_copy_);
    zero_copy_ = nullptr;
    for (void* region : old_zero_copy_) {
      if (region == nullptr) continue;
      if (has_put_peers_) ll::unregister_local_buffer(region);
      cudaFree(region);
    }
    old_zero_copy_.clear();
    cudaFree(local_control_);
    local_control_ = nullptr;
  } catch (...) {
    if (collective) throw;
  }
}

}  // namespace

namespace ll {
void launch_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw_cuda_error(status, what, __FILE__, __LINE__);
}
}  // namespace ll

std::unique_ptr<LowLatencyMode> make_low_latency_mode(const CudaContext& ctx) {
  return std::make_unique<NvshmemLowLatencyMode>(ctx);
}

}  // namespace epcomm::cuda
