#include "core/op_checks.hpp"

#include <algorithm>

#include "core/check.hpp"
#include "core/layouts.hpp"

namespace epcomm {
namespace {

constexpr std::initializer_list<DType> kIndexTypes = {DType::kInt64, DType::kInt32};
constexpr const char* kLowLatencyOnly = "was not created with low_latency_mode=True";

int checked_int(int64_t value, const char* op, const char* arg) {
  require(value >= 0 && value <= INT32_MAX, op, arg, "size ", value, " does not fit in int32");
  return static_cast<int>(value);
}

// A value SPEC allows but this backend does not: kUnsupported, naming the Limits field to ask.
void require_supported(const CheckContext& ctx, bool condition, const char* op, const char* arg, int64_t value,
                       int64_t limit, const char* field) {
  if (condition) [[likely]]
    return;
  throw_error(ErrorCode::kUnsupported,
              concat(op, ": ", arg, " = ", value, " is not supported yet by the ", to_string(ctx.limits.backend),
                     " backend (at most ", limit, "; see Buffer.limits().", field, ")"));
}

void check_num_experts(const GroupGeometry& g, int num_experts, const char* op, const char* arg) {
  require(num_experts > 0 && num_experts % g.num_ranks == 0, op, arg,
          "expected a positive multiple of the number of ranks (", g.num_ranks, "), got ", num_experts);
}

// Kernels of some backends read these tensors with 16-byte vector loads (Limits::data_alignment_bytes).
void check_aligned(const CheckContext& ctx, const TensorView& t, const char* op, const char* arg) {
  const int alignment = ctx.limits.data_alignment_bytes;
  if (alignment <= 1 || t.numel() == 0) return;
  const auto address = reinterpret_cast<uintptr_t>(t.data);
  require(address % alignment == 0, op, arg, "data must start on a ", alignment, "-byte boundary, got address 0x",
          std::hex, address, std::dec, " (offset ", address % alignment, ")");
}

// Normal mode moves tokens inside one node unless the backend also goes across nodes.
void check_node_count(const CheckContext& ctx, const char* op) {
  const int nodes = ctx.geometry.num_nodes();
  if (nodes > 1 && !ctx.limits.normal_inter_node)
    throw_error(ErrorCode::kUnsupported,
                concat(op, ": high-throughput mode across ", nodes, " nodes is not supported by the ",
                       to_string(ctx.limits.backend), " backend yet (one NVLink domain of up to ",
                       ctx.limits.max_ranks_per_node, " ranks is; see Buffer.limits().normal_inter_node)"));
}

Config checked_config(const CheckContext& ctx, const std::optional<Config>& given, Config fallback, const char* op) {
  Config config = given ? *given : fallback;
  config.validate();
  require(config.num_sms <= ctx.limits.max_num_sms, op, "config.num_sms", "expected at most ", ctx.limits.max_num_sms,
          " (Buffer.limits().max_num_sms: the device's SMs and the backend's channels), got ", config.num_sms);
  return config;
}

// hidden and K are checked before contiguity: a [T, 0] tensor has strides that look non-row-major,
// and "K = 0" says what is wrong.
void check_topk_idx(const CheckContext& ctx, const TensorView& topk_idx, int64_t num_tokens, int max_topk,
                    const char* op) {
  check_tensor(topk_idx, op, "topk_idx", {num_tokens, -1}, "[T, K]", kIndexTypes, ctx.device);
  require(topk_idx.size(1) >= 1 && topk_idx.size(1) <= max_topk, op, "topk_idx", "expected 1 <= K <= ", max_topk,
          ", got K = ", topk_idx.size(1));
  check_contiguous(topk_idx, op, "topk_idx");
}

// x of every operation: [rows, hidden] (or [L, rows, hidden]) with hidden > 0, then contiguous.
int check_hidden(const TensorView& x, const char* op) {
  const int64_t hidden = x.size(x.ndim - 1);
  require(hidden > 0, op, "x", "expected hidden > 0, got hidden = 0 (shape ", x.shape_string(), ")");
  check_contiguous(x, op, "x");
  return checked_int(hidden, op, "x");
}

void check_row_bytes(const CheckContext& ctx, int hidden, DType dtype, const char* op) {
  const int64_t row_bytes = int64_t(hidden) * dtype_size(dtype);
  const int alignment = ctx.limits.row_alignment_bytes;
  require(row_bytes % alignment == 0, op, "x", "hidden = ", hidden, " is not supported: a row must be a multiple of ",
          alignment, " bytes (got ", row_bytes, " bytes)");
}

void check_optional_vector(const CheckContext& ctx, const std::optional<TensorView>& t, const char* op, const char* arg,
                           int64_t length, const char* dims_doc, DType dtype) {
  if (!t) return;
  check_tensor(*t, op, arg, {length}, dims_doc, {dtype}, ctx.device);
  check_contiguous(*t, op, arg);
}

void check_handle_owner(const CheckContext& ctx, const DispatchHandle* handle, const char* op) {
  require(handle != nullptr, op, "handle", "expected the handle returned by dispatch, got none");
  require(handle->buffer_id == ctx.buffer_id, op, "handle", "was made by another Buffer (or a destroyed one): its ",
          "Buffer id is ", handle->buffer_id, ", this Buffer's is ", ctx.buffer_id);
  // Never reached with a handle of this Buffer; a guard against hand-made or corrupted handles, whose
  // tensors every later step would index by R.
  const int64_t R = ctx.geometry.num_ranks, T = handle->num_tokens;
  require(handle->num_ranks == R, op, "handle", "was made for ", handle->num_ranks, " ranks, this Buffer has ", R);
  require(handle->backend_state != nullptr && handle->rank_prefix_matrix.numel() == R * R &&
              handle->is_token_in_rank.numel() == T * R && handle->send_row.numel() == T * R &&
              handle->recv_src_idx.numel() == handle->num_recv_tokens,
          op, "handle", "its tensors do not match its sizes (R = ", R, ", T = ", T, ", ", handle->num_recv_tokens,
          " received rows)");
}

// FP8 scales (SPEC §1): float32 [T, hidden / 128], or int32 UE8M0-packed [T, hidden / 512] (four
// exponent bytes per int). Any strides. Both are 4-byte words that dispatch moves unchanged; a rank
// with the other kind has another S, which the call exchange compares.
int check_fp8_scales(const CheckContext& ctx, const DispatchInputs& in, int num_tokens, int hidden) {
  const char* op = "dispatch";
  require(in.x_scales.has_value(), op, "x_scales", "required when x is float8_e4m3fn");
  const TensorView& scales = *in.x_scales;
  check_shape(scales, op, "x_scales", {num_tokens, -1}, "[T, hidden / 128] float32 or [T, hidden / 512] int32");
  check_dtype(scales, op, "x_scales", ctx.limits.scale_dtypes);
  check_device(scales, op, "x_scales", ctx.device);
  const bool packed = scales.dtype == DType::kInt32;
  const int channels = packed ? 4 * kFp8GroupSize : kFp8GroupSize;
  const char* kind = packed ? "int32 (UE8M0-packed) scales" : "float32 scales";
  require(hidden % channels == 0, op, "x_scales", kind, " need hidden to be a multiple of ", channels,
          ", got hidden = ", hidden);
  const int64_t expected = hidden / channels;
  require(scales.size(1) == expected, op, "x_scales", "expected hidden / ", channels, " = ", expected, " columns of ",
          kind, ", got ", scales.size(1), " (shape ", scales.shape_string(), ")");
  return static_cast<int>(expected);
}

void check_fresh_routing(const CheckContext& ctx, const DispatchInputs& in, DispatchArgs& args) {
  const char* op = "dispatch";
  const GroupGeometry& g = ctx.geometry;
  const int64_t T = args.num_tokens;
  require(in.topk_idx || in.is_token_in_rank, op, "topk_idx",
          "a fresh dispatch needs topk_idx or is_token_in_rank (or a handle for a cached dispatch)");
  if (in.topk_idx) {
    check_topk_idx(ctx, *in.topk_idx, T, ctx.limits.max_topk, op);
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
  const int local_experts = args.num_experts / g.num_ranks;
  require_supported(ctx, local_experts <= ctx.limits.max_local_experts, op, "num_experts / R", local_experts,
                    ctx.limits.max_local_experts, "max_local_experts");
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

GroupGeometry check_buffer_options(const Limits& limits, const BufferOptions& options, int rank, int num_ranks) {
  const char* op = "Buffer";
  require(options.num_nvl_bytes >= 0, op, "num_nvl_bytes", "expected >= 0, got ", options.num_nvl_bytes);
  require(options.num_rdma_bytes >= 0, op, "num_rdma_bytes", "expected >= 0, got ", options.num_rdma_bytes);
  GroupGeometry g;
  g.rank = rank;
  g.num_ranks = num_ranks;
  // A backend that is not built has no limits: its factory says so after the common checks.
  const int max_ranks = limits.available ? limits.max_ranks : kMaxRanks;
  const int max_per_node = limits.available ? limits.max_ranks_per_node : kMaxRanksPerNode;
  require(num_ranks >= 1 && num_ranks <= max_ranks, op, "group", "expected 1..", max_ranks, " ranks, got ", num_ranks);
  g.ranks_per_node = options.ranks_per_node == 0 ? num_ranks : options.ranks_per_node;
  require(g.ranks_per_node >= 1 && g.ranks_per_node <= max_per_node && num_ranks % g.ranks_per_node == 0, op,
          "ranks_per_node", "expected 1..", max_per_node, " dividing the group size ", num_ranks, ", got ",
          options.ranks_per_node);
  // A backend that is not built, or a mode it lacks, is said here: before any collective step.
  if (limits.available && options.low_latency_mode && !limits.low_latency_mode)
    throw_error(ErrorCode::kUnsupported,
                concat(op, ": low_latency_mode: low-latency mode is not built into the ", to_string(limits.backend),
                       " backend of this epcomm (see Buffer.limits(): low_latency_mode)"));
  return g;
}

LayoutArgs check_layout(const CheckContext& ctx, const TensorView& topk_idx, int num_experts) {
  const char* op = "get_dispatch_layout";
  check_num_experts(ctx.geometry, num_experts, op, "num_experts");
  check_topk_idx(ctx, topk_idx, -1, ctx.limits.max_topk, op);
  LayoutArgs args;
  args.topk_idx = topk_idx;
  args.num_tokens = checked_int(topk_idx.size(0), op, "topk_idx");
  args.num_topk = static_cast<int>(topk_idx.size(1));
  args.num_experts = num_experts;
  return args;
}

DispatchArgs check_dispatch(const CheckContext& ctx, const DispatchInputs& in) {
  const char* op = "dispatch";
  check_node_count(ctx, op);
  DispatchArgs args;
  args.inputs = &in;
  check_shape(in.x, op, "x", {-1, -1}, "[T, hidden]");
  check_dtype(in.x, op, "x", ctx.limits.x_dtypes);
  check_device(in.x, op, "x", ctx.device);
  args.num_tokens = checked_int(in.x.size(0), op, "x");
  args.hidden = check_hidden(in.x, op);
  check_row_bytes(ctx, args.hidden, in.x.dtype, op);
  check_aligned(ctx, in.x, op, "x");
  args.fp8 = in.x.dtype == DType::kFloat8E4M3;
  if (args.fp8) {
    args.num_scales = check_fp8_scales(ctx, in, args.num_tokens, args.hidden);
  } else {
    require(!in.x_scales.has_value(), op, "x_scales", "given but x is bfloat16 (scales go with float8_e4m3fn x)");
  }
  require(in.expert_alignment >= 1, op, "expert_alignment", "expected >= 1, got ", in.expert_alignment);
  require(in.num_worst_tokens >= 0, op, "num_worst_tokens", "expected >= 0, got ", in.num_worst_tokens);
  args.config = checked_config(ctx, in.config, default_dispatch_config(ctx.geometry.num_ranks), op);

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
  check_node_count(ctx, op);
  check_handle_owner(ctx, in.handle, op);
  CombineArgs args;
  args.inputs = &in;
  args.num_tokens = in.handle->num_tokens;
  args.num_recv_tokens = in.handle->num_recv_tokens;
  check_tensor(in.x, op, "x", {args.num_recv_tokens, -1}, "[num_recv_tokens, hidden]", {DType::kBFloat16}, ctx.device);
  args.hidden = check_hidden(in.x, op);
  check_row_bytes(ctx, args.hidden, in.x.dtype, op);
  check_aligned(ctx, in.x, op, "x");
  if (in.topk_weights) {
    check_tensor(*in.topk_weights, op, "topk_weights", {args.num_recv_tokens, -1}, "[num_recv_tokens, K]",
                 {DType::kFloat32}, ctx.device);
    const int64_t K = in.topk_weights->size(1);
    // A handle of a dispatch with topk_idx knows K: the weights are its recv_topk_weights.
    if (in.handle->num_topk > 0)
      require(K == in.handle->num_topk, op, "topk_weights", "expected the dispatch's K = ", in.handle->num_topk,
              " columns, got K = ", K);
    require(K >= 1 && K <= ctx.limits.max_topk, op, "topk_weights", "expected 1 <= K <= ", ctx.limits.max_topk,
            ", got K = ", K);
    check_contiguous(*in.topk_weights, op, "topk_weights");
    args.num_topk = static_cast<int>(K);
  }
  for (auto [bias, name] : {std::pair{&in.bias_0, "bias_0"}, std::pair{&in.bias_1, "bias_1"}}) {
    if (!*bias) continue;
    check_tensor(**bias, op, name, {args.num_tokens, args.hidden}, "[T, hidden]", {DType::kBFloat16}, ctx.device);
    check_contiguous(**bias, op, name);
    check_aligned(ctx, **bias, op, name);
  }
  args.config = checked_config(ctx, in.config, default_combine_config(ctx.geometry.num_ranks), op);
  return args;
}

namespace {

// The sizes of a low-latency call against the backend's limits and the Buffer's memory.
void check_low_latency_sizes(const CheckContext& ctx, int max_tokens, int hidden, int num_experts, const char* op) {
  const Limits& limits = ctx.limits;
  require_supported(ctx, max_tokens <= limits.max_low_latency_tokens_per_rank, op, "num_max_dispatch_tokens_per_rank",
                    max_tokens, limits.max_low_latency_tokens_per_rank, "max_low_latency_tokens_per_rank");
  require_supported(ctx, num_experts <= limits.max_low_latency_experts, op, "num_experts", num_experts,
                    limits.max_low_latency_experts, "max_low_latency_experts");
  const int64_t needed = low_latency_buffer_size_hint(max_tokens, hidden, ctx.geometry.num_ranks, num_experts);
  if (needed > ctx.options.num_rdma_bytes)
    throw_error(ErrorCode::kOutOfCapacity,
                concat(op, ": num_rdma_bytes: the buffer has ", ctx.options.num_rdma_bytes,
                       " bytes but T_max = ", max_tokens, ", hidden = ", hidden, ", num_experts = ", num_experts,
                       " needs ", needed, " (get_low_latency_rdma_size_hint)"));
}

void check_low_latency_hidden(const CheckContext& ctx, int hidden, const char* op, const char* arg) {
  const int multiple = ctx.limits.low_latency_hidden_multiple;
  require(hidden > 0 && hidden % multiple == 0, op, arg, "hidden = ", hidden,
          " is not supported: expected a positive multiple of ", multiple);
}

void check_low_latency_options(const LowLatencyOptions& options, const char* op) {
  require(!(options.async_finish && options.return_recv_hook), op, "async_finish",
          "async_finish and return_recv_hook are mutually exclusive");
}

// The handle's own fields (shapes, consistency), shared by combine and the zero-copy buffer query.
void check_low_latency_handle(const CheckContext& ctx, const LowLatencyHandle& h, const char* op) {
  const GroupGeometry& g = ctx.geometry;
  require(h.buffer_id == 0 || h.buffer_id == ctx.buffer_id, op, "handle",
          "was made by another Buffer (or a destroyed one): its Buffer id is ", h.buffer_id, ", this Buffer's is ",
          ctx.buffer_id);
  require(h.num_max_dispatch_tokens_per_rank > 0, op, "handle",
          "num_max_dispatch_tokens_per_rank = ", h.num_max_dispatch_tokens_per_rank, " is not > 0");
  check_low_latency_hidden(ctx, h.hidden, op, "handle");
  check_num_experts(g, h.num_experts, op, "handle.num_experts");
  const int64_t L = h.num_experts / g.num_ranks;
  check_tensor(h.src_info, op, "handle.src_info", {L, int64_t(g.num_ranks) * h.num_max_dispatch_tokens_per_rank},
               "[L, R * T_max]", {DType::kInt32}, ctx.device);
  check_contiguous(h.src_info, op, "handle.src_info");
  check_tensor(h.layout_range, op, "handle.layout_range", {L, g.num_ranks}, "[L, R]", {DType::kInt64}, ctx.device);
  check_contiguous(h.layout_range, op, "handle.layout_range");
}

}  // namespace

LowLatencyDispatchArgs check_low_latency_dispatch(const CheckContext& ctx, const LowLatencyDispatchInputs& in,
                                                  const LowLatencyOptions& options) {
  const char* op = "low_latency_dispatch";
  const GroupGeometry& g = ctx.geometry;
  require(ctx.options.low_latency_mode, op, "Buffer", kLowLatencyOnly);
  check_low_latency_options(options, op);
  LowLatencyDispatchArgs args;
  args.inputs = &in;
  check_tensor(in.x, op, "x", {-1, -1}, "[T, hidden]", {DType::kBFloat16}, ctx.device);
  args.num_tokens = checked_int(in.x.size(0), op, "x");
  args.hidden = check_hidden(in.x, op);
  check_low_latency_hidden(ctx, args.hidden, op, "x");
  check_aligned(ctx, in.x, op, "x");
  args.max_tokens_per_rank = in.num_max_dispatch_tokens_per_rank;
  require(args.max_tokens_per_rank > 0, op, "num_max_dispatch_tokens_per_rank", "expected > 0, got ",
          args.max_tokens_per_rank);
  require(args.num_tokens <= args.max_tokens_per_rank, op, "x", "has T = ", args.num_tokens,
          " tokens, more than num_max_dispatch_tokens_per_rank = ", args.max_tokens_per_rank);
  check_topk_idx(ctx, in.topk_idx, args.num_tokens, ctx.limits.max_low_latency_topk, op);
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
  check_optional_vector(ctx, in.cumulative_local_expert_recv_stats, op, "cumulative_local_expert_recv_stats",
                        args.num_local_experts, "[L]", DType::kInt32);
  check_optional_vector(ctx, in.dispatch_wait_recv_cost_stats, op, "dispatch_wait_recv_cost_stats", g.num_ranks, "[R]",
                        DType::kInt64);
  check_low_latency_sizes(ctx, args.max_tokens_per_rank, args.hidden, args.num_experts, op);
  return args;
}

LowLatencyCombineArgs check_low_latency_combine(const CheckContext& ctx, const LowLatencyCombineInputs& in,
                                                const LowLatencyOptions& options) {
  const char* op = "low_latency_combine";
  const GroupGeometry& g = ctx.geometry;
  require(ctx.options.low_latency_mode, op, "Buffer", kLowLatencyOnly);
  check_low_latency_options(options, op);
  require(in.handle != nullptr, op, "handle", "expected the handle returned by low_latency_dispatch, got none");
  if (in.use_logfmt && !ctx.limits.use_logfmt)
    throw_error(ErrorCode::kUnsupported,
                concat(op, ": use_logfmt=True is not supported yet by the ", to_string(ctx.limits.backend),
                       " backend (Buffer.limits().use_logfmt)"));
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
  if (!in.zero_copy) check_aligned(ctx, in.x, op, "x");  // zero_copy: x is read from the Buffer's own memory
  check_topk_idx(ctx, in.topk_idx, -1, ctx.limits.max_low_latency_topk, op);
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
    check_aligned(ctx, *in.out, op, "out");
  }
  check_optional_vector(ctx, in.combine_wait_recv_cost_stats, op, "combine_wait_recv_cost_stats", g.num_ranks, "[R]",
                        DType::kInt64);
  check_low_latency_sizes(ctx, args.max_tokens_per_rank, args.hidden, args.num_experts, op);
  return args;
}

void check_next_low_latency_combine_buffer(const CheckContext& ctx, const LowLatencyHandle& handle) {
  const char* op = "get_next_low_latency_combine_buffer";
  require(ctx.options.low_latency_mode, op, "Buffer", kLowLatencyOnly);
  check_low_latency_handle(ctx, handle, op);
}

void check_clean_low_latency_buffer(const CheckContext& ctx, int max_tokens_per_rank, int hidden, int num_experts) {
  const char* op = "clean_low_latency_buffer";
  require(ctx.options.low_latency_mode, op, "Buffer", kLowLatencyOnly);
  require(max_tokens_per_rank > 0, op, "num_max_dispatch_tokens_per_rank", "expected > 0, got ", max_tokens_per_rank);
  check_low_latency_hidden(ctx, hidden, op, "hidden");
  check_num_experts(ctx.geometry, num_experts, op, "num_experts");
  check_low_latency_sizes(ctx, max_tokens_per_rank, hidden, num_experts, op);
}

void check_mask_call(const CheckContext& ctx, const char* op, std::optional<int> rank) {
  require(ctx.options.low_latency_mode, op, "Buffer", kLowLatencyOnly);
  require(ctx.options.enable_shrink, op, "Buffer", "was not created with enable_shrink=True");
  if (rank)
    require(*rank >= 0 && *rank < ctx.geometry.num_ranks, op, "rank", "expected 0..", ctx.geometry.num_ranks - 1,
            ", got ", *rank);
}

int64_t check_local_buffer(const CheckContext& ctx, DType dtype, int64_t offset_bytes,
                           std::optional<int64_t> num_elements, bool rdma_memory) {
  const char* op = "get_local_buffer_tensor";
  const int64_t total = rdma_memory ? ctx.options.num_rdma_bytes : ctx.options.num_nvl_bytes;
  const int64_t elem = static_cast<int64_t>(dtype_size(dtype));
  require(offset_bytes >= 0 && offset_bytes <= total && offset_bytes % elem == 0, op, "offset", "expected 0..", total,
          " and a multiple of ", elem, ", got ", offset_bytes);
  const int64_t count = num_elements ? *num_elements : (total - offset_bytes) / elem;
  require(count >= 0 && offset_bytes + count * elem <= total, op, "size", count, " elements at offset ", offset_bytes,
          " exceed the ", total, "-byte ", rdma_memory ? "rdma" : "nvl", " buffer");
  return count;
}

}  // namespace epcomm
