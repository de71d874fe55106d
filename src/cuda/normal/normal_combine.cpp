// Host side of combine: one kernel, routing from the handle.
#include <algorithm>

#include "core/check.hpp"
#include "cuda/normal/call_support.hpp"
#include "cuda/normal/launch.hpp"
#include "cuda/normal/normal_mode.hpp"

namespace epcomm::cuda {

CombineResult NormalMode::combine(const CombineArgs& args, const StreamOptions& stream) {
  const char* op = "combine";
  const CombineInputs& in = *args.inputs;
  const DispatchHandle& handle = *in.handle;
  const int R = ctx_.geometry.num_ranks, T = args.num_tokens, K = args.num_topk;
  require(handle.num_ranks == R && handle.backend_state != nullptr, op, "handle",
          "was not made by a dispatch of this buffer");
  const auto& state = *static_cast<const NormalHandleState*>(handle.backend_state.get());

  RecordLayout record;
  record.payload_bytes = args.hidden * 2;
  record.num_topk = K;
  CombineParams p{};
  p.common = common_params(args.config, record, op);
  const int Q = p.common.queues.queue_tokens;
  // A window must fit in what the senders can publish ahead of it (see kernels/combine.cu).
  p.window_tokens = std::clamp((Q - p.common.chunk_tokens + 1) / 2, 1, 128);
  CallStreams streams(ctx_.comm_stream, stream, events_);
  const Device device = ctx_.tensor_device();

  p.signature =
      with_rejections(call_signature(CallKind::kCombine, false, K > 0, K, record.payload_bytes, 0), rejections_);
  p.handle_meta = state.meta.data_as<const int32_t>();
  p.rank_prefix_matrix = handle.rank_prefix_matrix.data_as<const int32_t>();
  p.x = in.x.data_as<const uint16_t>();
  p.num_recv_rows = args.num_recv_tokens;
  p.topk_weights = in.topk_weights ? in.topk_weights->data_as<const float>() : nullptr;
  p.recv_src_idx = handle.recv_src_idx.data_as<const int32_t>();
  p.num_tokens = T;
  p.hidden = args.hidden;
  p.in_rank = handle.is_token_in_rank.data_as<const uint8_t>();
  p.bias0 = in.bias_0 ? in.bias_0->data_as<const uint16_t>() : nullptr;
  p.bias1 = in.bias_1 ? in.bias_1->data_as<const uint16_t>() : nullptr;

  CombineResult result;
  result.combined_x =
      allocate(*args.allocator, DType::kBFloat16, {T, args.hidden}, device, streams.allocation_stream());
  p.combined_x = result.combined_x.data_as<uint16_t>();
  require_vector_aligned(result.combined_x, op, "combined_x (from the allocator)");
  if (K > 0) {
    result.combined_topk_weights =
        allocate(*args.allocator, DType::kFloat32, {T, K}, device, streams.allocation_stream());
    p.combined_weights = result.combined_topk_weights->data_as<float>();
  }
  launch_combine(p, streams.comm());
  result.event = streams.finish();
  return result;
}

}  // namespace epcomm::cuda
