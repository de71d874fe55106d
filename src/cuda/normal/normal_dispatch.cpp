// Host side of dispatch: fresh (route: routing kernel -> exchange counts: notify -> size outputs:
// [host wait] -> move: dispatch kernel) and cached (dispatch kernel only, routing from the handle).
#include <algorithm>

#include "core/allocate.hpp"
#include "core/check.hpp"
#include "core/cuda_check.hpp"
#include "cuda/normal/call_support.hpp"
#include "cuda/normal/launch.hpp"
#include "cuda/normal/normal_mode.hpp"

namespace epcomm::cuda {
namespace {

RecordLayout dispatch_record(const DispatchArgs& args, int num_topk) {
  RecordLayout record;
  record.payload_bytes = static_cast<int32_t>(int64_t(args.hidden) * dtype_size(args.inputs->x.dtype));
  record.num_scales = args.fp8 ? args.num_scales : 0;
  record.num_topk = num_topk;
  return record;
}

// recv_x and recv_x_scales with `rows` rows; scales keep the input's majorness (row-major when
// x_scales.stride(1) == 1, else allocated [S, rows] and returned transposed).
void allocate_received_tokens(const DispatchArgs& args, int rows, Allocator& allocator, Device device,
                              cudaStream_t stream, DispatchResult& result, DispatchParams& p) {
  const DispatchInputs& in = *args.inputs;
  result.recv_x = allocate(allocator, in.x.dtype, {rows, args.hidden}, device, stream);
  require_vector_aligned(result.recv_x, "dispatch", "recv_x (from the allocator)");
  p.recv_x = result.recv_x.data_as<uint8_t>();
  p.num_rows = rows;
  if (!args.fp8) return;
  // float32 or int32 UE8M0-packed scales: both 4-byte words the kernels copy unchanged.
  p.x_scales = in.x_scales->data_as<const float>();
  p.scale_stride_token = in.x_scales->stride(0);
  p.scale_stride_scale = in.x_scales->stride(1);
  p.scales_column_major = in.x_scales->stride(1) != 1;
  result.recv_x_scales =
      p.scales_column_major
          ? allocate_column_major(allocator, in.x_scales->dtype, {rows, args.num_scales}, device, stream)
          : allocate(allocator, in.x_scales->dtype, {rows, args.num_scales}, device, stream);
  p.recv_scales = result.recv_x_scales->data_as<float>();
}

}  // namespace

DispatchResult NormalMode::dispatch(const DispatchArgs& args, const StreamOptions& stream) {
  return args.cached ? cached_dispatch(args, stream) : fresh_dispatch(args, stream);
}

// A fresh dispatch on its way through the phases of fresh_dispatch.
struct NormalMode::FreshDispatch {
  const DispatchArgs& args;
  const DispatchInputs& in;
  int R, T, K, E, L;
  bool have_topk;
  bool have_expert_counts;  // topk_idx or num_tokens_per_expert given: the expert counts travel
  bool worst;               // num_worst_tokens > 0: fixed output sizes, no host wait
  RecordLayout record;
  NormalCommon common;
  Device device;
  cudaStream_t comm, alloc_stream;
  std::shared_ptr<DispatchHandle> handle = std::make_shared<DispatchHandle>();
  std::shared_ptr<NormalHandleState> state = std::make_shared<NormalHandleState>();
  int32_t host_sequence = 0;  // of the counts notify publishes (without num_worst_tokens)
};

DispatchResult NormalMode::fresh_dispatch(const DispatchArgs& args, const StreamOptions& stream) {
  const char* op = "dispatch";
  const DispatchInputs& in = *args.inputs;
  const int R = ctx_.geometry.num_ranks, E = args.num_experts;
  const bool have_topk = in.topk_idx.has_value();
  const bool have_expert_counts = have_topk || in.num_tokens_per_expert.has_value();
  const int L = have_expert_counts ? E / R : 0;

  const RecordLayout record = dispatch_record(args, args.num_topk);
  const NormalCommon common = common_params(args.config, record, op);
  CallStreams streams(ctx_.comm_stream, stream, events_);
  FreshDispatch call{args,
                     in,
                     R,
                     args.num_tokens,
                     args.num_topk,
                     E,
                     L,
                     have_topk,
                     have_expert_counts,
                     in.num_worst_tokens > 0,
                     record,
                     common,
                     ctx_.tensor_device(),
                     streams.comm(),
                     streams.allocation_stream()};

  route(call);
  exchange_counts(call);
  DispatchResult result;
  const int rows = size_outputs(call, result, op);
  // A data error (bad index, mismatch) seen so far: the kernels still finish the protocol (or all skip
  // it), then this call throws.
  const bool error_pending = ctx_.errors->is_set();
  move_tokens(call, rows, result);
  if (error_pending) {
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(call.comm));
    ctx_.errors->throw_if_set();
  }

  DispatchHandle& handle = *call.handle;
  handle.num_ranks = R;
  handle.num_tokens = call.T;
  handle.num_recv_tokens = rows;
  handle.num_topk = call.K;
  handle.backend_state = std::move(call.state);
  handle.buffer_id = buffer_id_;
  result.handle = std::move(call.handle);
  result.event = streams.finish();
  return result;
}

// 1. Where this rank's tokens go, per channel: the handle's routing tensors (filled on the device)
// and the channel counts.
void NormalMode::route(FreshDispatch& call) {
  const DispatchInputs& in = call.in;
  const int R = call.R, T = call.T, E = call.E;
  Allocator& allocator = *call.args.allocator;
  DispatchHandle& handle = *call.handle;
  handle.rank_prefix_matrix = allocate(allocator, DType::kInt32, {R, R}, call.device, call.alloc_stream);
  handle.is_token_in_rank = allocate(allocator, DType::kBool, {T, R}, call.device, call.alloc_stream);
  handle.send_row = allocate(allocator, DType::kInt32, {T, R}, call.device, call.alloc_stream);
  call.state->meta = allocate(allocator, DType::kInt32, {R + 2}, call.device, call.alloc_stream);
  fill_bytes(handle.is_token_in_rank.data, 0, size_t(T) * R, call.comm);
  fill_bytes(handle.send_row.data, 0xFF, sizeof(int32_t) * T * R, call.comm);  // -1
  fill_bytes(&state_->routed_tokens, 0, sizeof(int32_t), call.comm);
  if (call.have_topk) fill_bytes(state_->expert_counts, 0, sizeof(int32_t) * E, call.comm);

  RoutingParams routing{};
  routing.topk_idx = call.have_topk ? in.topk_idx->data : nullptr;
  routing.topk_is_int64 = call.have_topk && in.topk_idx->dtype == DType::kInt64;
  routing.num_topk = call.K;
  routing.in_rank_given = in.is_token_in_rank ? in.is_token_in_rank->data_as<const uint8_t>() : nullptr;
  routing.num_tokens = T;
  routing.num_ranks = R;
  routing.num_experts = E;
  routing.ranks_per_node = ctx_.geometry.ranks_per_node;
  routing.in_rank = handle.is_token_in_rank.data_as<uint8_t>();
  routing.expert_counts = call.have_topk ? state_->expert_counts : nullptr;
  routing.block_rank_counts = &state_->channel_counts[0][0];
  routing.routed_tokens = &state_->routed_tokens;
  routing.errors = call.common.errors;
  routing.phase = DevicePhase::kNotify;
  launch_routing(routing, call.common.queues.num_channels, call.comm);
}

// 2. Count exchange (and entry barrier): rank_prefix_matrix, the handle's meta and, without
// num_worst_tokens, the received counts for the host.
void NormalMode::exchange_counts(FreshDispatch& call) {
  const DispatchInputs& in = call.in;
  NotifyParams notify{};
  notify.common = call.common;
  notify.signature = with_rejections(call_signature(CallKind::kDispatch, call.args.fp8, in.topk_weights.has_value(),
                                                    call.K, call.record.payload_bytes, call.record.num_scales),
                                     rejections_);
  notify.num_tokens = call.T;
  notify.num_worst_tokens = in.num_worst_tokens;
  notify.num_experts = call.E;
  notify.num_local_experts = call.L;
  notify.expert_counts =
      call.have_topk ? state_->expert_counts
                     : (in.num_tokens_per_expert ? in.num_tokens_per_expert->data_as<const int32_t>() : nullptr);
  notify.check_rank_counts = in.num_tokens_per_rank ? in.num_tokens_per_rank->data_as<const int32_t>() : nullptr;
  notify.check_node_counts =
      in.num_tokens_per_rdma_rank ? in.num_tokens_per_rdma_rank->data_as<const int32_t>() : nullptr;
  notify.check_expert_counts =
      call.have_topk && in.num_tokens_per_expert ? in.num_tokens_per_expert->data_as<const int32_t>() : nullptr;
  notify.rank_prefix_matrix = call.handle->rank_prefix_matrix.data_as<int32_t>();
  notify.handle_meta = call.state->meta.data_as<int32_t>();
  notify.host = call.worst ? nullptr : host_counts_device_;
  notify.host_sequence = call.worst ? 0 : ++host_sequence_;
  call.host_sequence = notify.host_sequence;
  launch_notify(notify, call.comm);
}

// 3. Output sizes: num_worst_tokens, or what notify counted (the only host wait of the mode).
int NormalMode::size_outputs(const FreshDispatch& call, DispatchResult& result, const char* op) const {
  if (call.worst) return call.in.num_worst_tokens;
  wait_for_counts(call.host_sequence, op);
  if (call.have_expert_counts)
    for (int l = 0; l < call.L; ++l)
      result.num_recv_tokens_per_expert.push_back(
          static_cast<int>(align_up(host_counts_->num_recv_per_expert[l], call.in.expert_alignment)));
  return host_counts_->num_recv;
}

// 4. Move the tokens into `rows` received rows.
void NormalMode::move_tokens(const FreshDispatch& call, int rows, DispatchResult& result) {
  const DispatchInputs& in = call.in;
  const int R = call.R, K = call.K;
  Allocator& allocator = *call.args.allocator;
  DispatchHandle& handle = *call.handle;
  DispatchParams p{};
  p.common = call.common;
  p.num_tokens = call.T;
  p.x = static_cast<const uint8_t*>(in.x.data);
  if (call.have_topk) {
    p.topk_idx = in.topk_idx->data;
    p.topk_is_int64 = in.topk_idx->dtype == DType::kInt64;
  }
  p.topk_weights = in.topk_weights ? in.topk_weights->data_as<const float>() : nullptr;
  p.num_experts = call.E;
  p.num_local_experts = call.E / R;
  p.in_rank = handle.is_token_in_rank.data_as<const uint8_t>();
  p.send_row = handle.send_row.data_as<int32_t>();
  p.rank_prefix_matrix = handle.rank_prefix_matrix.data_as<const int32_t>();
  allocate_received_tokens(call.args, rows, allocator, call.device, call.alloc_stream, result, p);
  if (K > 0) {
    result.recv_topk_idx = allocate(allocator, DType::kInt64, {rows, K}, call.device, call.alloc_stream);
    p.recv_topk_idx = result.recv_topk_idx->data_as<int64_t>();
    if (in.topk_weights) {
      result.recv_topk_weights = allocate(allocator, DType::kFloat32, {rows, K}, call.device, call.alloc_stream);
      p.recv_topk_weights = result.recv_topk_weights->data_as<float>();
    }
  }
  handle.recv_src_idx = allocate(allocator, DType::kInt32, {rows}, call.device, call.alloc_stream);
  p.recv_src_idx = handle.recv_src_idx.data_as<int32_t>();
  p.drop_overflow = call.worst;
  p.fill_empty_rows = call.worst;
  launch_dispatch(p, call.comm);
}

DispatchResult NormalMode::cached_dispatch(const DispatchArgs& args, const StreamOptions& stream) {
  const char* op = "dispatch";
  const DispatchInputs& in = *args.inputs;
  const DispatchHandle& handle = *in.handle;
  const int R = ctx_.geometry.num_ranks;
  require(handle.num_ranks == R && handle.backend_state != nullptr, op, "handle",
          "was not made by a dispatch of this buffer");
  const auto& state = *static_cast<const NormalHandleState*>(handle.backend_state.get());

  const RecordLayout record = dispatch_record(args, /*num_topk=*/0);
  DispatchParams p{};
  p.common = common_params(args.config, record, op);
  CallStreams streams(ctx_.comm_stream, stream, events_);

  p.cached = 1;
  p.signature = with_rejections(
      call_signature(CallKind::kCachedDispatch, args.fp8, false, 0, record.payload_bytes, record.num_scales),
      rejections_);
  p.handle_meta = state.meta.data_as<const int32_t>();
  p.num_tokens = args.num_tokens;
  p.x = static_cast<const uint8_t*>(in.x.data);
  p.in_rank = handle.is_token_in_rank.data_as<const uint8_t>();
  p.send_row = handle.send_row.data_as<int32_t>();
  p.rank_prefix_matrix = handle.rank_prefix_matrix.data_as<const int32_t>();
  p.drop_overflow = 1;  // a num_worst_tokens handle may route rows past its capacity (already reported)

  DispatchResult result;
  allocate_received_tokens(args, handle.num_recv_tokens, *args.allocator, ctx_.tensor_device(),
                           streams.allocation_stream(), result, p);
  launch_dispatch(p, streams.comm());
  result.event = streams.finish();
  return result;
}

}  // namespace epcomm::cuda
