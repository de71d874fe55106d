// Host side of dispatch: fresh (routing -> notify -> [host wait] -> dispatch kernel) and cached
// (dispatch kernel only, routing from the handle).
#include <algorithm>

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
  p.x_scales = in.x_scales->data_as<const float>();
  p.scale_stride_token = in.x_scales->stride(0);
  p.scale_stride_scale = in.x_scales->stride(1);
  p.scales_column_major = in.x_scales->stride(1) != 1;
  if (!p.scales_column_major) {
    result.recv_x_scales = allocate(allocator, DType::kFloat32, {rows, args.num_scales}, device, stream);
  } else {
    const Tensor column_major = allocate(allocator, DType::kFloat32, {args.num_scales, rows}, device, stream);
    result.recv_x_scales = column_major.with_view(column_major.transposed(0, 1));
  }
  p.recv_scales = result.recv_x_scales->data_as<float>();
}

}  // namespace

DispatchResult NormalMode::dispatch(const DispatchArgs& args, const StreamOptions& stream) {
  return args.cached ? cached_dispatch(args, stream) : fresh_dispatch(args, stream);
}

DispatchResult NormalMode::fresh_dispatch(const DispatchArgs& args, const StreamOptions& stream) {
  const char* op = "dispatch";
  const DispatchInputs& in = *args.inputs;
  const GroupGeometry& g = ctx_.geometry;
  const int R = g.num_ranks, T = args.num_tokens, K = args.num_topk, E = args.num_experts;
  const bool have_topk = in.topk_idx.has_value();
  const bool have_expert_counts = have_topk || in.num_tokens_per_expert.has_value();
  const int L = have_expert_counts ? E / R : 0;
  const bool worst = in.num_worst_tokens > 0;
  if (have_expert_counts)
    require(L <= kMaxLocalExperts, op, "num_experts", "at most ", kMaxLocalExperts, " experts per rank supported, got ",
            L);

  require_vector_aligned(in.x, op, "x");
  const RecordLayout record = dispatch_record(args, K);
  const NormalCommon common = common_params(args.config, record, op);
  const int C = common.queues.num_channels;
  const Device device = ctx_.tensor_device();
  Allocator& allocator = *args.allocator;
  CallStreams streams(ctx_.comm_stream, stream, events_);
  const cudaStream_t comm = streams.comm(), alloc_stream = streams.allocation_stream();

  // The handle's routing tensors, filled on the device.
  auto handle = std::make_shared<DispatchHandle>();
  auto state = std::make_shared<NormalHandleState>();
  handle->rank_prefix_matrix = allocate(allocator, DType::kInt32, {R, R}, device, alloc_stream);
  handle->is_token_in_rank = allocate(allocator, DType::kBool, {T, R}, device, alloc_stream);
  handle->send_row = allocate(allocator, DType::kInt32, {T, R}, device, alloc_stream);
  state->meta = allocate(allocator, DType::kInt32, {R + 2}, device, alloc_stream);
  fill_bytes(handle->is_token_in_rank.data, 0, size_t(T) * R, comm);
  fill_bytes(handle->send_row.data, 0xFF, sizeof(int32_t) * T * R, comm);  // -1
  fill_bytes(&state_->routed_tokens, 0, sizeof(int32_t), comm);
  if (have_topk) fill_bytes(state_->expert_counts, 0, sizeof(int32_t) * E, comm);

  // 1. Where this rank's tokens go, per channel.
  RoutingParams routing{};
  routing.topk_idx = have_topk ? in.topk_idx->data : nullptr;
  routing.topk_is_int64 = have_topk && in.topk_idx->dtype == DType::kInt64;
  routing.num_topk = K;
  routing.in_rank_given = in.is_token_in_rank ? in.is_token_in_rank->data_as<const uint8_t>() : nullptr;
  routing.num_tokens = T;
  routing.num_ranks = R;
  routing.num_experts = E;
  routing.ranks_per_node = g.ranks_per_node;
  routing.in_rank = handle->is_token_in_rank.data_as<uint8_t>();
  routing.expert_counts = have_topk ? state_->expert_counts : nullptr;
  routing.block_rank_counts = &state_->channel_counts[0][0];
  routing.routed_tokens = &state_->routed_tokens;
  routing.errors = common.errors;
  routing.phase = DevicePhase::kNotify;
  launch_routing(routing, C, comm);

  // 2. Count exchange (and entry barrier).
  NotifyParams notify{};
  notify.common = common;
  notify.signature = with_rejections(call_signature(CallKind::kDispatch, args.fp8, in.topk_weights.has_value(), K,
                                                    record.payload_bytes, record.num_scales),
                                     rejections_);
  notify.num_tokens = T;
  notify.num_worst_tokens = in.num_worst_tokens;
  notify.num_experts = E;
  notify.num_local_experts = L;
  notify.expert_counts =
      have_topk ? state_->expert_counts
                : (in.num_tokens_per_expert ? in.num_tokens_per_expert->data_as<const int32_t>() : nullptr);
  notify.check_rank_counts = in.num_tokens_per_rank ? in.num_tokens_per_rank->data_as<const int32_t>() : nullptr;
  notify.check_node_counts =
      in.num_tokens_per_rdma_rank ? in.num_tokens_per_rdma_rank->data_as<const int32_t>() : nullptr;
  notify.check_expert_counts =
      have_topk && in.num_tokens_per_expert ? in.num_tokens_per_expert->data_as<const int32_t>() : nullptr;
  notify.rank_prefix_matrix = handle->rank_prefix_matrix.data_as<int32_t>();
  notify.handle_meta = state->meta.data_as<int32_t>();
  notify.host = worst ? nullptr : host_counts_device_;
  notify.host_sequence = worst ? 0 : ++host_sequence_;
  launch_notify(notify, comm);

  // 3. Output sizes: num_worst_tokens, or what notify counted (the only host wait of the mode).
  DispatchResult result;
  int rows = in.num_worst_tokens;
  if (!worst) {
    wait_for_counts(notify.host_sequence, op);
    rows = host_counts_->num_recv;
    if (have_expert_counts)
      for (int l = 0; l < L; ++l)
        result.num_recv_tokens_per_expert.push_back(
            static_cast<int>(align_up(host_counts_->num_recv_per_expert[l], in.expert_alignment)));
  }
  // A data error (bad index, mismatch) seen so far: the kernels still finish the protocol (or all skip
  // it), then this call throws.
  const bool error_pending = ctx_.errors->is_set();

  // 4. Move the tokens.
  DispatchParams p{};
  p.common = common;
  p.num_tokens = T;
  p.x = static_cast<const uint8_t*>(in.x.data);
  if (have_topk) {
    p.topk_idx = in.topk_idx->data;
    p.topk_is_int64 = in.topk_idx->dtype == DType::kInt64;
  }
  p.topk_weights = in.topk_weights ? in.topk_weights->data_as<const float>() : nullptr;
  p.num_experts = E;
  p.num_local_experts = E / R;
  p.in_rank = handle->is_token_in_rank.data_as<const uint8_t>();
  p.send_row = handle->send_row.data_as<int32_t>();
  p.rank_prefix_matrix = handle->rank_prefix_matrix.data_as<const int32_t>();
  allocate_received_tokens(args, rows, allocator, device, alloc_stream, result, p);
  if (K > 0) {
    result.recv_topk_idx = allocate(allocator, DType::kInt64, {rows, K}, device, alloc_stream);
    p.recv_topk_idx = result.recv_topk_idx->data_as<int64_t>();
    if (in.topk_weights) {
      result.recv_topk_weights = allocate(allocator, DType::kFloat32, {rows, K}, device, alloc_stream);
      p.recv_topk_weights = result.recv_topk_weights->data_as<float>();
    }
  }
  handle->recv_src_idx = allocate(allocator, DType::kInt32, {rows}, device, alloc_stream);
  p.recv_src_idx = handle->recv_src_idx.data_as<int32_t>();
  p.drop_overflow = worst;
  p.fill_empty_rows = worst;
  launch_dispatch(p, comm);

  if (error_pending) {
    EPCOMM_CUDA_CHECK(cudaStreamSynchronize(comm));
    ctx_.errors->throw_if_set();
  }
  handle->num_ranks = R;
  handle->num_tokens = T;
  handle->num_recv_tokens = rows;
  handle->num_topk = K;
  handle->backend_state = std::move(state);
  handle->buffer_id = buffer_id_;
  result.handle = std::move(handle);
  result.event = streams.finish();
  return result;
}

DispatchResult NormalMode::cached_dispatch(const DispatchArgs& args, const StreamOptions& stream) {
  const char* op = "dispatch";
  const DispatchInputs& in = *args.inputs;
  const DispatchHandle& handle = *in.handle;
  const int R = ctx_.geometry.num_ranks;
  require(handle.num_ranks == R && handle.backend_state != nullptr, op, "handle",
          "was not made by a dispatch of this buffer");
  const auto& state = *static_cast<const NormalHandleState*>(handle.backend_state.get());

  require_vector_aligned(in.x, op, "x");
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
