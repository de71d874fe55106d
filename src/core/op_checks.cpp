#include "core/op_checks.hpp"

#include "core/check.hpp"
#include "core/layouts.hpp"

namespace epcomm {
namespace {

constexpr std::initializer_list<DType> kIndexTypes = {DType::kInt64, DType::kInt32};

int checked_int(int64_t value, const char* op, const char* arg) {
  require(value >= 0 && value <= INT32_MAX, op, arg, "size ", value, " does not fit in int32");
  return static_cast<int>(value);
}

void check_num_experts(const GroupGeometry& g, int num_experts, const char* op, const char* arg) {
  require(num_experts > 0 && num_experts % g.num_ranks == 0, op, arg,
          "expected a positive multiple of the number of ranks (", g.num_ranks, "), got ", num_experts);
}

void check_topk_idx(const CheckContext& ctx, const TensorView& topk_idx, int64_t num_tokens, int max_topk,
                    const char* op) {
  check_tensor(topk_idx, op, "topk_idx", {num_tokens, -1}, "[T, K]", kIndexTypes, ctx.device);
  check_contiguous(topk_idx, op, "topk_idx");
  require(topk_idx.size(1) >= 1 && topk_idx.size(1) <= max_topk, op, "topk_idx", "expected 1 <= K <= ", max_topk,
          ", got K = ", topk_idx.size(1));
}

void check_optional_vector(const CheckContext& ctx, const std::optional<TensorView>& t, const char* op, const char* arg,
                           int64_t length, const char* dims_doc, DType dtype) {
  if (!t) return;
  check_tensor(*t, op, arg, {length}, dims_doc, {dtype}, ctx.device);
  check_contiguous(*t, op, arg);
}

void check_handle_owner(const CheckContext& ctx, const DispatchHandle* handle, const char* op) {
  require(handle != nullptr, op, "handle", "expected the handle returned by dispatch, got none");
  require(handle->owner == ctx.owner, op, "handle", "was made by another Buffer (or a destroyed one)");
}

void check_fresh_routing(const CheckContext& ctx, const DispatchInputs& in, DispatchArgs& args) {
  const char* op = "dispatch";
  const GroupGeometry& g = ctx.geometry;
  const int64_t T = args.num_tokens;
  require(in.topk_idx || in.is_token_in_rank, op, "topk_idx",
          "a fresh dispatch needs topk_idx or is_token_in_rank (or a handle for a cached dispatch)");
  if (in.topk_idx) {
    check_topk_idx(ctx, *in.topk_idx, T, kMaxTopk, op);
    args.num_topk = checked_int(in.topk_idx->size(1), op, "topk_idx");
  }
  if (in.topk_weights) {
    require(in.topk_idx.has_value(), op, "topk_weights", "given without topk_idx");
    check_tensor(*in.topk_weights, op, "topk_weights", {T, args.num_topk}, "[T, K]", {DType::kFloat32}, ctx.device);
    check_contiguous(*in.topk_weights, op, "topk_weights");
  }
  check_optional_vector(ctx, in.num_tokens_per_rank, op, "num_tokens_per_rank", g.num_ranks, "[R]", DType::kInt32);
  check_optional_vector(ctx, in.num_tokens_per_rdma_rank, op, "num_tokens_per_rdma_rank", g.num_nodes(), "[N]",
                        DType::kInt32);
  if (in.is_token_in_rank) {
    check_tensor(*in.is_token_in_rank, op, "is_token_in_rank", {T, g.num_ranks}, "[T, R]", {DType::kBool}, ctx.device);
    check_contiguous(*in.is_token_in_rank, op, "is_token_in_rank");
  }
  if (in.num_tokens_per_expert) {
    check_tensor(*in.num_tokens_per_expert, op, "num_tokens_per_expert", {-1}, "[E]", {DType::kInt32}, ctx.device);
    check_contiguous(*in.num_tokens_per_expert, op, "num_tokens_per_expert");
    const int64_t E = in.num_tokens_per_expert->size(0);
    check_num_experts(g, checked_int(E, op, "num_tokens_per_expert"), op, "num_tokens_per_expert");
    require(in.num_experts == 0 || in.num_experts == E, op, "num_experts", "is ", in.num_experts,
            " but num_tokens_per_expert has ", E, " entries");
    args.num_experts = static_cast<int>(E);
  } else if (in.num_experts != 0 || in.topk_idx) {
    check_num_experts(g, in.num_experts, op, "num_experts");
    args.num_experts = in.num_experts;
  }
}

void check_cached_routing(const CheckContext& ctx, const DispatchInputs& in, DispatchArgs& args) {
  const char* op = "dispatch";
  check_handle_owner(ctx, in.handle, op);
  const bool any_routing = in.topk_idx || in.topk_weights || in.num_tokens_per_rank || in.num_tokens_per_rdma_rank ||
                           in.is_token_in_rank || in.num_tokens_per_expert;
  require(!any_routing, op, "handle",
          "a cached dispatch takes its routing from the handle: pass topk_idx, topk_weights and the layout as None");
  require(args.num_tokens == in.handle->num_tokens, op, "x", "has ", args.num_tokens,
          " tokens but the handle was made for ", in.handle->num_tokens);
}

}  // namespace

LayoutArgs check_layout(const CheckContext& ctx, const TensorView& topk_idx, int num_experts) {
  const char* op = "get_dispatch_layout";
  check_num_experts(ctx.geometry, num_experts, op, "num_experts");
  check_topk_idx(ctx, topk_idx, -1, kMaxTopk, op);
  LayoutArgs args;
  args.topk_idx = topk_idx;
  args.num_tokens = checked_int(topk_idx.size(0), op, "topk_idx");
  args.num_topk = static_cast<int>(topk_idx.size(1));
  args.num_experts = num_experts;
  return args;
}

DispatchArgs check_dispatch(const CheckContext& ctx, const DispatchInputs& in) {
  const char* op = "dispatch";
  DispatchArgs args;
  args.inputs = &in;
  check_tensor(in.x, op, "x", {-1, -1}, "[T, hidden]", {DType::kBFloat16, DType::kFloat8E4M3}, ctx.device);
  check_contiguous(in.x, op, "x");
  args.num_tokens = checked_int(in.x.size(0), op, "x");
  args.hidden = checked_int(in.x.size(1), op, "x");
  args.fp8 = in.x.dtype == DType::kFloat8E4M3;
  const int64_t row_bytes = int64_t(args.hidden) * dtype_size(in.x.dtype);
  require(args.hidden > 0 && row_bytes % 16 == 0, op, "x", "hidden = ", args.hidden,
          " is not supported: a row must be a positive multiple of 16 bytes (got ", row_bytes, " bytes)");
  if (args.fp8) {
    require(in.x_scales.has_value(), op, "x_scales", "required when x is float8_e4m3fn");
    check_tensor(*in.x_scales, op, "x_scales", {args.num_tokens, -1}, "[T, hidden / 128]", {DType::kFloat32},
                 ctx.device);
    args.num_scales = checked_int(in.x_scales->size(1), op, "x_scales");
    require(args.num_scales >= 1, op, "x_scales", "expected at least one scale per token");
  } else {
    require(!in.x_scales.has_value(), op, "x_scales", "given but x is bfloat16 (scales go with float8_e4m3fn x)");
  }
  require(in.expert_alignment >= 1, op, "expert_alignment", "expected >= 1, got ", in.expert_alignment);
  require(in.num_worst_tokens >= 0, op, "num_worst_tokens", "expected >= 0, got ", in.num_worst_tokens);
  args.config = in.config ? *in.config : default_dispatch_config(ctx.geometry.num_ranks);
  args.config.validate();

  args.cached = in.handle != nullptr;
  if (args.cached) {
    check_cached_routing(ctx, in, args);
  } else {
    check_fresh_routing(ctx, in, args);
  }
  return args;
}

CombineArgs check_combine(const CheckContext& ctx, const CombineInputs& in) {
  const char* op = "combine";
  check_handle_owner(ctx, in.handle, op);
  CombineArgs args;
  args.inputs = &in;
  args.num_tokens = in.handle->num_tokens;
  args.num_recv_tokens = in.handle->num_recv_tokens;
  check_tensor(in.x, op, "x", {args.num_recv_tokens, -1}, "[num_recv_tokens, hidden]", {DType::kBFloat16}, ctx.device);
  check_contiguous(in.x, op, "x");
  args.hidden = checked_int(in.x.size(1), op, "x");
  require(args.hidden > 0 && args.hidden * 2 % 16 == 0, op, "x", "hidden = ", args.hidden,
          " is not supported: a row must be a positive multiple of 16 bytes");
  if (in.topk_weights) {
    check_tensor(*in.topk_weights, op, "topk_weights", {args.num_recv_tokens, -1}, "[num_recv_tokens, K]",
                 {DType::kFloat32}, ctx.device);
    check_contiguous(*in.topk_weights, op, "topk_weights");
    args.num_topk = checked_int(in.topk_weights->size(1), op, "topk_weights");
    require(args.num_topk >= 1 && args.num_topk <= kMaxTopk, op, "topk_weights", "expected 1 <= K <= ", kMaxTopk,
            ", got K = ", args.num_topk);
  }
  for (auto [bias, name] : {std::pair{&in.bias_0, "bias_0"}, std::pair{&in.bias_1, "bias_1"}}) {
    if (!*bias) continue;
    check_tensor(**bias, op, name, {args.num_tokens, args.hidden}, "[T, hidden]", {DType::kBFloat16}, ctx.device);
    check_contiguous(**bias, op, name);
  }
  args.config = in.config ? *in.config : default_combine_config(ctx.geometry.num_ranks);
  args.config.validate();
  return args;
}

namespace {

void check_low_latency_buffer(const CheckContext& ctx, int max_tokens, int hidden, int num_experts, const char* op) {
  require(ctx.options.low_latency_mode, op, "Buffer", "was not created with low_latency_mode=True");
  const int64_t needed = low_latency_buffer_size_hint(max_tokens, hidden, ctx.geometry.num_ranks, num_experts);
  if (needed > ctx.options.num_rdma_bytes)
    throw_error(ErrorCode::kOutOfCapacity,
                concat(op, ": num_rdma_bytes: the buffer has ", ctx.options.num_rdma_bytes,
                       " bytes but T_max = ", max_tokens, ", hidden = ", hidden, ", num_experts = ", num_experts,
                       " needs ", needed, " (get_low_latency_rdma_size_hint)"));
}

void check_stats(const CheckContext& ctx, const std::optional<TensorView>& t, const char* op, const char* arg,
                 int64_t length, const char* dims_doc, DType dtype) {
  check_optional_vector(ctx, t, op, arg, length, dims_doc, dtype);
}

void check_low_latency_options(const LowLatencyOptions& options, const char* op) {
  require(!(options.async_finish && options.return_recv_hook), op, "async_finish",
          "async_finish and return_recv_hook are mutually exclusive");
}

}  // namespace

LowLatencyDispatchArgs check_low_latency_dispatch(const CheckContext& ctx, const LowLatencyDispatchInputs& in,
                                                  const LowLatencyOptions& options) {
  const char* op = "low_latency_dispatch";
  const GroupGeometry& g = ctx.geometry;
  check_low_latency_options(options, op);
  LowLatencyDispatchArgs args;
  args.inputs = &in;
  check_tensor(in.x, op, "x", {-1, -1}, "[T, hidden]", {DType::kBFloat16}, ctx.device);
  check_contiguous(in.x, op, "x");
  args.num_tokens = checked_int(in.x.size(0), op, "x");
  args.hidden = checked_int(in.x.size(1), op, "x");
  require(args.hidden > 0 && args.hidden % kFp8GroupSize == 0, op, "x", "hidden = ", args.hidden,
          " is not supported: expected a positive multiple of ", kFp8GroupSize);
  args.max_tokens_per_rank = in.num_max_dispatch_tokens_per_rank;
  require(args.max_tokens_per_rank > 0, op, "num_max_dispatch_tokens_per_rank", "expected > 0, got ",
          args.max_tokens_per_rank);
  require(args.num_tokens <= args.max_tokens_per_rank, op, "x", "has T = ", args.num_tokens,
          " tokens, more than num_max_dispatch_tokens_per_rank = ", args.max_tokens_per_rank);
  check_topk_idx(ctx, in.topk_idx, args.num_tokens, kMaxLowLatencyTopk, op);
  args.num_topk = static_cast<int>(in.topk_idx.size(1));
  check_num_experts(g, in.num_experts, op, "num_experts");
  args.num_experts = in.num_experts;
  args.num_local_experts = in.num_experts / g.num_ranks;
  if (in.use_ue8m0) {
    require(in.use_fp8 && in.round_scale, op, "use_ue8m0", "requires use_fp8=True and round_scale=True");
    require(args.hidden % (4 * kFp8GroupSize) == 0, op, "use_ue8m0",
            "packs four scales per int32: hidden must be a multiple of 512, got ", args.hidden);
  }
  require(!in.round_scale || in.use_fp8, op, "round_scale", "requires use_fp8=True");
  check_stats(ctx, in.cumulative_local_expert_recv_stats, op, "cumulative_local_expert_recv_stats",
              args.num_local_experts, "[L]", DType::kInt32);
  check_stats(ctx, in.dispatch_wait_recv_cost_stats, op, "dispatch_wait_recv_cost_stats", g.num_ranks, "[R]",
              DType::kInt64);
  check_low_latency_buffer(ctx, args.max_tokens_per_rank, args.hidden, args.num_experts, op);
  return args;
}

void check_low_latency_handle(const CheckContext& ctx, const LowLatencyHandle& h, const char* op) {
  const GroupGeometry& g = ctx.geometry;
  require(h.num_max_dispatch_tokens_per_rank > 0, op, "handle",
          "num_max_dispatch_tokens_per_rank = ", h.num_max_dispatch_tokens_per_rank, " is not > 0");
  require(h.hidden > 0 && h.hidden % kFp8GroupSize == 0, op, "handle", "hidden = ", h.hidden, " is invalid");
  check_num_experts(g, h.num_experts, op, "handle.num_experts");
  const int64_t L = h.num_experts / g.num_ranks;
  check_tensor(h.src_info, op, "handle.src_info", {L, int64_t(g.num_ranks) * h.num_max_dispatch_tokens_per_rank},
               "[L, R * T_max]", {DType::kInt32}, ctx.device);
  check_contiguous(h.src_info, op, "handle.src_info");
  check_tensor(h.layout_range, op, "handle.layout_range", {L, g.num_ranks}, "[L, R]", {DType::kInt64}, ctx.device);
  check_contiguous(h.layout_range, op, "handle.layout_range");
}

LowLatencyCombineArgs check_low_latency_combine(const CheckContext& ctx, const LowLatencyCombineInputs& in,
                                                const LowLatencyOptions& options) {
  const char* op = "low_latency_combine";
  const GroupGeometry& g = ctx.geometry;
  check_low_latency_options(options, op);
  require(in.handle != nullptr, op, "handle", "expected the handle returned by low_latency_dispatch, got none");
  // LogFMT (docs/LOGFMT.md) is built on the CPU backend only so far.
  if (in.use_logfmt && ctx.device.is_cuda())
    throw_error(ErrorCode::kUnsupported, concat(op, ": use_logfmt=True is not supported yet on the CUDA backend"));
  const LowLatencyHandle& h = *in.handle;
  check_low_latency_handle(ctx, h, op);
  LowLatencyCombineArgs args;
  args.inputs = &in;
  args.hidden = h.hidden;
  args.num_experts = h.num_experts;
  args.num_local_experts = h.num_experts / g.num_ranks;
  args.max_tokens_per_rank = h.num_max_dispatch_tokens_per_rank;
  check_tensor(in.x, op, "x", {args.num_local_experts, int64_t(g.num_ranks) * args.max_tokens_per_rank, args.hidden},
               "[L, R * T_max, hidden]", {DType::kBFloat16}, ctx.device);
  check_contiguous(in.x, op, "x");
  check_topk_idx(ctx, in.topk_idx, -1, kMaxLowLatencyTopk, op);
  args.num_tokens = checked_int(in.topk_idx.size(0), op, "topk_idx");
  args.num_topk = static_cast<int>(in.topk_idx.size(1));
  require(args.num_tokens <= args.max_tokens_per_rank, op, "topk_idx", "has T = ", args.num_tokens,
          " tokens, more than the handle's T_max = ", args.max_tokens_per_rank);
  check_tensor(in.topk_weights, op, "topk_weights", {args.num_tokens, args.num_topk}, "[T, K]", {DType::kFloat32},
               ctx.device);
  check_contiguous(in.topk_weights, op, "topk_weights");
  if (in.out) {
    check_tensor(*in.out, op, "out", {args.num_tokens, args.hidden}, "[T, hidden]", {DType::kBFloat16}, ctx.device);
    check_contiguous(*in.out, op, "out");
  }
  check_stats(ctx, in.combine_wait_recv_cost_stats, op, "combine_wait_recv_cost_stats", g.num_ranks, "[R]",
              DType::kInt64);
  check_low_latency_buffer(ctx, args.max_tokens_per_rank, args.hidden, args.num_experts, op);
  return args;
}

}  // namespace epcomm
