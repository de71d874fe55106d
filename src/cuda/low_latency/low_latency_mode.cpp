// Low-latency mode over NVSHMEM: owns the symmetric memory, the call parities, the outputs, and
// launches the kernels of dispatch.cu / combine.cu. See ll_params.hpp for the control region.
//
// Calls alternate between two parity blocks of the symmetric memory (dispatch and combine count
// separately), so a call's data stays in place until the call after next. Flags and counters are
// cleared by the kernels that consume them: nothing depends on a host-side call count, and a
// captured CUDA graph can be replayed any number of times.
#include "cuda/low_latency/low_latency_mode.hpp"

#include <unistd.h>  // gethostname

#include <array>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/allocate.hpp"
#include "core/check.hpp"
#include "core/cuda_check.hpp"
#include "core/environment.hpp"
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

// Inputs are checked by the front (Limits::data_alignment_bytes); this checks what the allocator returns.
void require_aligned(const void* pointer, const char* op, const char* arg) {
  require(reinterpret_cast<uintptr_t>(pointer) % 16 == 0, op, arg,
          "data must be 16-byte aligned for vector access, got address ", pointer);
}

// The put path the options ask for ($EPCOMM_LL_PUT_PATH refines kAuto; bad values are an error
// naming the variable).
LowLatencyPutPath resolve_put_path(const BufferOptions& options) {
  if (!options.allow_nvlink_for_low_latency_mode) return LowLatencyPutPath::kAll;
  if (options.low_latency_put_path != LowLatencyPutPath::kAuto) return options.low_latency_put_path;
  const std::optional<std::string> env = env_text("EPCOMM_LL_PUT_PATH");
  if (!env || env->empty()) return LowLatencyPutPath::kAuto;
  const std::string& value = *env;
  if (value == "auto") return LowLatencyPutPath::kAuto;
  if (value == "mapped") return LowLatencyPutPath::kMapped;
  if (value == "all") return LowLatencyPutPath::kAll;
  throw_error(ErrorCode::kInvalidArgument,
              concat("Buffer: $EPCOMM_LL_PUT_PATH: expected auto, mapped or all, got '", value, "'"));
}

// Collective: true when every rank of the group runs on this host (same host name), so that
// NVSHMEM's start-up may stay on the loopback interface even with emulated nodes.
bool all_on_one_host(Bootstrap& bootstrap) {
  struct HostName {
    char name[256] = {};
  } mine;
  gethostname(mine.name, sizeof(mine.name) - 1);
  std::vector<HostName> all(bootstrap.size());
  bootstrap.all_gather(&mine, all.data(), sizeof(HostName));
  for (const HostName& other : all)
    if (std::strncmp(other.name, mine.name, sizeof(mine.name)) != 0) return false;
  return true;
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
  std::vector<bool> put_peers() const override { return put_peers_; }
  void skip_call(bool dispatch) override {
    if (dispatch) {
      dispatches_[dispatch_parity_] = {};  // that parity's handle ends here, as if overwritten
      dispatch_parity_ ^= 1;
    } else {
      combine_parity_ ^= 1;
    }
  }
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
  // The sizes against this Buffer's symmetric memory (T_max and E against Limits: op_checks.cpp).
  void check_capacity(int max_tokens, int hidden, int num_experts, const char* op) const;
  int find_dispatch(const LowLatencyHandle& handle) const;
  // A device region of at least `bytes` for `region` (zero_copy_ or staging_), registered with
  // NVSHMEM as a source of puts when a remote transport carries some of them.
  uint16_t* ensure_region(void*& region, int64_t& region_bytes, int64_t bytes);
  uint16_t* ensure_zero_copy(int64_t bytes) { return ensure_region(zero_copy_, zero_copy_bytes_, bytes); }
  void build_peer_table(LowLatencyPutPath path);
  // The phases of a call: outputs and kernel params, the send kernel, then the receive kernel now
  // or in a hook.
  LowLatencyDispatchResult allocate_dispatch_outputs(const LowLatencyDispatchArgs& args, int64_t num_rows,
                                                     cudaStream_t stream) const;
  ll::DispatchParams dispatch_params(const LowLatencyDispatchArgs& args, const LowLatencyLayout& lay,
                                     const LowLatencyDispatchResult& result) const;
  ll::CombineParams combine_params(const LowLatencyCombineArgs& args, const LowLatencyLayout& lay, int dispatch_parity,
                                   const Tensor& combined_x, const char* op);
  template <class Params>
  using RecvLauncher = void (*)(const Params&, int num_sms, cudaStream_t stream, bool overlap_send);
  template <class Params>
  void receive(const Params& p, RecvLauncher<Params> launch_recv, bool overlap_send, std::vector<Tensor> keep,
               const char* op, const LowLatencyOptions& options, Event& event, RecvHook& hook) const;

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
  std::vector<bool> put_peers_;       // [R]: the peer table's zero entries, as built
  bool has_put_peers_ = false;        // some peer gets puts (the kernels quiet before they signal)
  bool has_remote_peers_ = false;     // some peer has no NVLink mapping: a remote transport carries its puts,
                                      // and the combine staging region must be registered with NVSHMEM

  int dispatch_parity_ = 0;  // parity of the next dispatch
  int combine_parity_ = 0;
  std::array<DispatchRecord, 2> dispatches_{};

  // Zero-copy region [L, R x T_max, hidden] bf16 (LowLatencyLayout::zero_copy_bytes): what a
  // zero_copy combine sends (stores or puts straight from it).
  void* zero_copy_ = nullptr;
  int64_t zero_copy_bytes_ = 0;
  // Staging region of the same shape, only with put peers: a combine that is not zero_copy copies
  // the rows for put peers here and puts from here. Apart from the zero-copy region, so that such a
  // combine never overwrites rows the caller has already written for its next zero_copy combine.
  void* staging_ = nullptr;
  int64_t staging_bytes_ = 0;
  std::vector<void*> old_regions_;  // outgrown regions, freed by destroy (kernels may still read them)

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
  overlap_send_ = env_flag("EPCOMM_LL_PDL").value_or(true);
  dispatch_overlap_max_tokens_ =
      static_cast<int>(env_int("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS").value_or(kDefaultDispatchOverlapMaxTokens));
  const LowLatencyPutPath put_path = resolve_put_path(*ctx.options);
  DeviceGuard guard(device_);
  const bool one_host = all_on_one_host(*ctx.bootstrap);
  ll::ensure_nvshmem(*ctx.bootstrap, device_, bytes, geometry_.num_nodes() == 1 || one_host);
  symmetric_ = static_cast<uint8_t*>(ll::allocate_symmetric(bytes));
  symmetric_bytes_ = bytes;
  EPCOMM_CUDA_CHECK(cudaMemset(symmetric_, 0, static_cast<size_t>(bytes)));
  local_control_ = static_cast<uint8_t*>(malloc_outside_capture(LocalControlLayout::kEnd));
  EPCOMM_CUDA_CHECK(cudaMemset(local_control_, 0, static_cast<size_t>(LocalControlLayout::kEnd)));

  build_peer_table(put_path);
  int max_smem = 0;
  EPCOMM_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
  ll::prepare_dispatch_kernels(max_smem);
  ll::prepare_combine_kernels(max_smem);
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  ll::nvshmem_group_barrier();  // every rank's flags are zero before anyone sends
}

// The peer table of the control region: rank r's symmetric memory as mapped here, or 0 where r
// gets NVSHMEM puts (ll_params.hpp). Emulated nodes on one host are all mapped; kAuto still sends
// to the other nodes' ranks with puts, so that the put path runs where a test can check it.
void NvshmemLowLatencyMode::build_peer_table(LowLatencyPutPath path) {
  const int me = geometry_.rank;
  std::vector<uint64_t> peers(geometry_.num_ranks);
  put_peers_.assign(geometry_.num_ranks, false);
  for (int r = 0; r < geometry_.num_ranks; ++r) {
    const uint64_t mapped = reinterpret_cast<uint64_t>(ll::peer_pointer(symmetric_, r));
    const bool other_node = geometry_.node_of(r) != geometry_.node_of(me);
    const bool puts =
        mapped == 0 || path == LowLatencyPutPath::kAll || (path == LowLatencyPutPath::kAuto && other_node);
    peers[r] = puts ? 0 : mapped;
    put_peers_[r] = puts;
    has_put_peers_ |= puts;
    has_remote_peers_ |= mapped == 0;
  }
  EPCOMM_CUDA_CHECK(cudaMemcpy(peer_bases(), peers.data(), peers.size() * sizeof(uint64_t), cudaMemcpyHostToDevice));
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

void NvshmemLowLatencyMode::check_capacity(int max_tokens, int hidden, int num_experts, const char* op) const {
  const int64_t needed = layout(max_tokens, hidden, num_experts).total_bytes();
  if (needed > symmetric_bytes_)
    throw_error(ErrorCode::kOutOfCapacity,
                concat(op, ": num_rdma_bytes: the buffer has ", symmetric_bytes_, " bytes, these sizes need ", needed));
}

// The receive half of a call: launched now on options.stream (with `overlap_send`, as a programmatic
// dependent of the send kernel), or, with return_recv_hook, by the returned hook on the stream it is
// given, keeping `keep` (the outputs the kernel writes) alive until then.
template <class Params>
void NvshmemLowLatencyMode::receive(const Params& p, RecvLauncher<Params> launch_recv, bool overlap_send,
                                    std::vector<Tensor> keep, const char* op, const LowLatencyOptions& options,
                                    Event& event, RecvHook& hook) const {
  if (!options.return_recv_hook) {
    launch_recv(p, num_sms_, options.stream, overlap_send);
    if (options.async_finish) event = Event::record(options.stream);
    return;
  }
  const int num_sms = num_sms_, device_index = device_;
  hook = RecvHook(
      [alive = alive_, p, launch_recv, num_sms, device_index, keep = std::move(keep), op](StreamHandle hook_stream) {
        if (!*alive) throw_error(ErrorCode::kInvalidArgument, concat(op, " recv hook: the Buffer was destroyed"));
        DeviceGuard hook_guard(device_index);
        launch_recv(p, num_sms, hook_stream, /*overlap_send=*/false);
      });
}

LowLatencyDispatchResult NvshmemLowLatencyMode::allocate_dispatch_outputs(const LowLatencyDispatchArgs& args,
                                                                          int64_t num_rows, cudaStream_t stream) const {
  const LowLatencyDispatchInputs& in = *args.inputs;
  const int hidden = args.hidden, L = args.num_local_experts, R = geometry_.num_ranks;
  const int64_t N = num_rows;
  Allocator& allocator = *args.allocator;
  const Device device = Device::cuda(device_);
  LowLatencyDispatchResult result;
  result.recv_x =
      allocate(allocator, in.use_fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, {L, N, hidden}, device, stream);
  if (in.use_fp8) {
    const int64_t columns = in.use_ue8m0 ? hidden / 512 : hidden / 128;
    // Column-major in the last two dimensions (allocated [L, S, N]).
    result.recv_x_scales = allocate_column_major(allocator, in.use_ue8m0 ? DType::kInt32 : DType::kFloat32,
                                                 {L, N, columns}, device, stream);
  }
  result.recv_count = allocate(allocator, DType::kInt32, {L}, device, stream);
  result.handle.src_info = allocate(allocator, DType::kInt32, {L, N}, device, stream);
  result.handle.layout_range = allocate(allocator, DType::kInt64, {L, R}, device, stream);
  result.handle.num_max_dispatch_tokens_per_rank = args.max_tokens_per_rank;
  result.handle.hidden = hidden;
  result.handle.num_experts = args.num_experts;
  return result;
}

ll::DispatchParams NvshmemLowLatencyMode::dispatch_params(const LowLatencyDispatchArgs& args,
                                                          const LowLatencyLayout& lay,
                                                          const LowLatencyDispatchResult& result) const {
  const LowLatencyDispatchInputs& in = *args.inputs;
  const int parity = dispatch_parity_;
  ll::DispatchParams p;
  p.c = common();
  p.parity = parity;
  p.x = in.x.data_as<const uint16_t>();
  p.topk_idx = in.topk_idx.data;
  p.topk_is_int64 = in.topk_idx.dtype == DType::kInt64 ? 1 : 0;
  p.num_tokens = args.num_tokens;
  p.hidden = args.hidden;
  p.num_topk = args.num_topk;
  p.num_experts = args.num_experts;
  p.num_local_experts = args.num_local_experts;
  p.max_tokens = args.max_tokens_per_rank;
  p.format = !in.use_fp8      ? ll::Format::kBf16
             : in.use_ue8m0   ? ll::Format::kFp8Ue8m0
             : in.round_scale ? ll::Format::kFp8RoundScale
                              : ll::Format::kFp8;
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
  return p;
}

LowLatencyDispatchResult NvshmemLowLatencyMode::dispatch(const LowLatencyDispatchArgs& args,
                                                         const LowLatencyOptions& options) {
  const char* op = "low_latency_dispatch";
  check_usable(op);
  DeviceGuard guard(device_);
  const int T_max = args.max_tokens_per_rank;
  check_capacity(T_max, args.hidden, args.num_experts, op);
  const LowLatencyLayout lay = layout(T_max, args.hidden, args.num_experts);

  LowLatencyDispatchResult result = allocate_dispatch_outputs(args, lay.num_rows(), options.stream);
  const ll::DispatchParams p = dispatch_params(args, lay, result);
  ll::launch_dispatch_send(p, num_sms_, options.stream);
  std::vector<Tensor> keep = {result.recv_x, result.recv_count, result.handle.src_info, result.handle.layout_range};
  if (result.recv_x_scales) keep.push_back(*result.recv_x_scales);
  receive(p, &ll::launch_dispatch_recv, overlap_send_ && args.num_tokens <= dispatch_overlap_max_tokens_,
          std::move(keep), op, options, result.event, result.hook);

  dispatches_[p.parity] = DispatchRecord{result.handle.src_info.data, T_max, args.hidden, args.num_experts};
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

ll::CombineParams NvshmemLowLatencyMode::combine_params(const LowLatencyCombineArgs& args, const LowLatencyLayout& lay,
                                                        int dispatch_parity, const Tensor& combined_x, const char* op) {
  const LowLatencyCombineInputs& in = *args.inputs;
  const LowLatencyHandle& handle = *in.handle;
  const int parity = combine_parity_;
  ll::CombineParams p;
  p.c = common();
  p.parity = parity;
  if (in.zero_copy) {
    require(zero_copy_ != nullptr && zero_copy_bytes_ >= lay.zero_copy_bytes(), op, "zero_copy",
            "is True but get_next_low_latency_combine_buffer(handle) was not called for a dispatch of this shape");
    p.x = static_cast<const uint16_t*>(zero_copy_);
    p.x_is_staging = 1;
  } else {
    p.x = in.x.data_as<const uint16_t>();
  }
  p.staging =
      has_put_peers_ && !in.zero_copy ? ensure_region(staging_, staging_bytes_, lay.zero_copy_bytes()) : nullptr;
  p.src_info = handle.src_info.data_as<const int32_t>();
  p.layout_range = handle.layout_range.data_as<const int64_t>();
  p.meta = symmetric_ + lay.dispatch_meta_offset(dispatch_parity);
  p.topk_idx = in.topk_idx.data;
  p.topk_is_int64 = in.topk_idx.dtype == DType::kInt64 ? 1 : 0;
  p.topk_weights = in.topk_weights.data_as<const float>();
  p.out = combined_x.data_as<uint16_t>();
  p.wait_stats = in.combine_wait_recv_cost_stats ? in.combine_wait_recv_cost_stats->data_as<int64_t>() : nullptr;
  p.num_tokens = args.num_tokens;
  p.hidden = args.hidden;
  p.num_topk = args.num_topk;
  p.num_experts = args.num_experts;
  p.num_local_experts = args.num_local_experts;
  p.max_tokens = args.max_tokens_per_rank;
  p.recv_offset = lay.combine_recv_offset(parity);
  return p;
}

LowLatencyCombineResult NvshmemLowLatencyMode::combine(const LowLatencyCombineArgs& args,
                                                       const LowLatencyOptions& options) {
  const char* op = "low_latency_combine";
  check_usable(op);
  DeviceGuard guard(device_);
  const LowLatencyCombineInputs& in = *args.inputs;
  const int dispatch_parity = find_dispatch(*in.handle);
  check_capacity(args.max_tokens_per_rank, args.hidden, args.num_experts, op);
  const LowLatencyLayout lay = layout(args.max_tokens_per_rank, args.hidden, args.num_experts);

  LowLatencyCombineResult result;
  result.combined_x = in.out ? Tensor::borrowed(*in.out)
                             : allocate(*args.allocator, DType::kBFloat16, {args.num_tokens, args.hidden},
                                        Device::cuda(device_), options.stream);
  if (!in.out) require_aligned(result.combined_x.data, op, "combined_x (from the allocator)");
  const ll::CombineParams p = combine_params(args, lay, dispatch_parity, result.combined_x, op);
  ll::launch_combine_send(p, num_sms_, options.stream);
  receive(p, &ll::launch_combine_recv, overlap_send_, {result.combined_x}, op, options, result.event, result.hook);
  combine_parity_ ^= 1;
  return result;
}

uint16_t* NvshmemLowLatencyMode::ensure_region(void*& current, int64_t& current_bytes, int64_t bytes) {
  if (current != nullptr && current_bytes >= bytes) return static_cast<uint16_t*>(current);
  if (current != nullptr) old_regions_.push_back(current);
  current = nullptr;
  current_bytes = 0;
  void* region = malloc_outside_capture(bytes);
  if (has_remote_peers_) {  // puts to mapped peers are copies over NVLink: any device memory will do
    try {
      ll::register_local_buffer(region, bytes);
    } catch (...) {
      cudaFree(region);
      throw;
    }
  }
  current = region;
  current_bytes = bytes;
  return static_cast<uint16_t*>(current);
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
  check_capacity(max_tokens_per_rank, hidden, num_experts, "clean_low_latency_buffer");
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
    old_regions_.push_back(zero_copy_);
    old_regions_.push_back(staging_);
    zero_copy_ = nullptr;
    staging_ = nullptr;
    for (void* region : old_regions_) {
      if (region == nullptr) continue;
      if (has_remote_peers_) ll::unregister_local_buffer(region);
      cudaFree(region);
    }
    old_regions_.clear();
    cudaFree(local_control_);
    local_control_ = nullptr;
  } catch (...) {
    if (collective) throw;
  }
}

}  // namespace

bool low_latency_mode_built() { return true; }

std::unique_ptr<LowLatencyMode> make_low_latency_mode(const CudaContext& ctx) {
  return std::make_unique<NvshmemLowLatencyMode>(ctx);
}

}  // namespace epcomm::cuda
