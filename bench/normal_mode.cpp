// Normal (high-throughput) mode: get_dispatch_layout, the full non-cached dispatch (layout + notify
// + host wait + dispatch), the cached dispatch (BF16 and FP8) and the combine, per SM count.
#include <algorithm>

#include "core/check.hpp"
#include "modes.hpp"
#include "traffic.hpp"

namespace epcomm::bench {
namespace {

struct NormalInputs {
  Tensor x_bf16;        // [T, hidden] bf16
  Tensor x_fp8;         // [T, hidden] float8_e4m3
  Tensor x_fp8_scales;  // [T, hidden / 128] float32, column-major (as DeepEP's tests pass them)
  Tensor topk_idx;      // [T, K] int64
  Tensor topk_weights;  // [T, K] float32
};

NormalInputs upload_inputs(Platform& p, const WorkloadData& data, int rank) {
  const Workload& w = data.workload;
  const int S = w.hidden / 128;
  std::vector<uint8_t> fp8(size_t(w.tokens) * w.hidden);
  std::vector<float> scales_by_group(size_t(S) * w.tokens);  // [S, T]: the column-major storage
  for (int64_t t = 0; t < w.tokens; ++t) {
    data.values.fp8_row(rank, t, w.hidden, fp8.data() + t * w.hidden);
    for (int g = 0; g < S; ++g) scales_by_group[size_t(g) * w.tokens + t] = data.values.fp8_scale(rank, t, g);
  }
  NormalInputs in;
  in.x_bf16 = p.upload(DType::kBFloat16, {w.tokens, w.hidden}, data.x_bf16.data());
  in.x_fp8 = p.upload(DType::kFloat8E4M3, {w.tokens, w.hidden}, fp8.data());
  const Tensor scales = p.upload(DType::kFloat32, {S, w.tokens}, scales_by_group.data());
  in.x_fp8_scales = scales.with_view(scales.transposed(0, 1));
  in.topk_idx = p.upload(DType::kInt64, {w.tokens, w.topk}, data.topk_idx.data());
  in.topk_weights = p.upload(DType::kFloat32, {w.tokens, w.topk}, data.topk_weights.data());
  return in;
}

// The SM counts to run: the list of --num-sms on CUDA; on the CPU backend, which has no SMs, one
// run with the default Config (reported with num_sms null).
std::vector<std::optional<int>> sm_counts(const BenchContext& ctx) {
  std::vector<std::optional<int>> counts;
  if (ctx.platform.backend() == BackendKind::kCpu) return {std::nullopt};
  for (const int sms : ctx.options.num_sms) counts.push_back(sms);
  return counts;
}

// The default Config with the SM count and the --nvl-chunk / --nvl-queue overrides.
Config with_sms(const BenchContext& ctx, Config config, std::optional<int> num_sms) {
  if (num_sms) config.num_sms = *num_sms;
  if (ctx.options.nvl_chunk_tokens > 0) config.num_max_nvl_chunked_send_tokens = ctx.options.nvl_chunk_tokens;
  if (ctx.options.nvl_queue_tokens > 0) config.num_max_nvl_chunked_recv_tokens = ctx.options.nvl_queue_tokens;
  return config;
}

int64_t buffer_bytes(const BenchContext& ctx, const Workload& w) {
  int64_t bytes = 0;
  for (const std::optional<int> sms : sm_counts(ctx)) {
    const int64_t hidden_bytes = int64_t(w.hidden) * 2;  // the BF16 size, for FP8 too
    bytes = std::max(
        bytes, with_sms(ctx, default_dispatch_config(ctx.ranks), sms).nvl_buffer_size_hint(hidden_bytes, ctx.ranks));
    bytes = std::max(
        bytes, with_sms(ctx, default_combine_config(ctx.ranks), sms).nvl_buffer_size_hint(hidden_bytes, ctx.ranks));
  }
  return bytes;
}

class NormalModeBench {
 public:
  NormalModeBench(BenchContext& ctx, const WorkloadData& data, Buffer& buffer)
      : ctx_(ctx),
        data_(data),
        w_(data.workload),
        buffer_(buffer),
        in_(upload_inputs(ctx.platform, data, ctx.rank)),
        oracle_(w_, data.routing, data.values, ctx.rank, buffer.ranks_per_node()) {}

  void layout();
  void at_sms(std::optional<int> num_sms);

 private:
  LayoutResult run_layout() { return buffer_.get_dispatch_layout(in_.topk_idx, w_.experts, ctx_.stream_options()); }
  DispatchResult full_dispatch(bool fp8, const Config& config);
  DispatchResult cached_dispatch(bool fp8, const DispatchHandle& handle, const Config& config);
  CombineResult combine(const DispatchResult& fresh, const Config& config, bool with_weights);

  Mismatch check_full_dispatch(bool fp8, const Config& config, DispatchResult* keep = nullptr);
  Mismatch check_cached_dispatch(bool fp8, const DispatchHandle& handle, const Config& config);
  Mismatch check_combine(const DispatchResult& fresh, const Config& config);
  // Across emulated nodes: the network bytes of the fresh BF16 dispatch and of a combine with weights.
  void report_network_bytes(const DispatchResult& fresh, const Config& combine_config);

  double recv_bytes(bool fp8) const {
    const int64_t per_token = fp8 ? w_.hidden + w_.hidden / 128 * 4 : int64_t(w_.hidden) * 2;
    return double(data_.recv_tokens) * double(per_token);
  }
  static std::string dtype(bool fp8) { return fp8 ? "fp8" : "bf16"; }
  std::string name(const std::string& op, bool fp8, std::optional<int> sms) const {
    return concat(w_.label(), " ", op, " ", dtype(fp8), sms ? concat(" @ ", *sms, " SMs") : std::string());
  }
  FigureKey key(const std::string& op, bool fp8, std::optional<int> sms) const {
    return ctx_.key(w_, "epcomm", op, dtype(fp8), sms);
  }
  bool check() const { return ctx_.options.check; }

  BenchContext& ctx_;
  const WorkloadData& data_;
  const Workload& w_;
  Buffer& buffer_;
  NormalInputs in_;
  Oracle oracle_;
};

void NormalModeBench::layout() {
  measure(
      ctx_, concat(w_.label(), " layout"), ctx_.key(w_, "epcomm", "layout", std::nullopt, std::nullopt), -1,
      [&]() -> Mismatch {
        const LayoutResult result = run_layout();
        return check() ? oracle_.layout(ctx_.platform, result) : std::nullopt;
      },
      [&] { run_layout(); });
}

DispatchResult NormalModeBench::full_dispatch(bool fp8, const Config& config) {
  const LayoutResult layout = run_layout();
  DispatchInputs inputs;
  inputs.x = fp8 ? in_.x_fp8 : in_.x_bf16;
  if (fp8) inputs.x_scales = in_.x_fp8_scales;
  inputs.topk_idx = in_.topk_idx;
  inputs.topk_weights = in_.topk_weights;
  inputs.num_tokens_per_rank = layout.num_tokens_per_rank;
  inputs.is_token_in_rank = layout.is_token_in_rank;
  inputs.num_tokens_per_expert = layout.num_tokens_per_expert;
  inputs.num_experts = w_.experts;
  inputs.config = config;
  return buffer_.dispatch(inputs, ctx_.stream_options());
}

DispatchResult NormalModeBench::cached_dispatch(bool fp8, const DispatchHandle& handle, const Config& config) {
  DispatchInputs inputs;
  inputs.x = fp8 ? in_.x_fp8 : in_.x_bf16;
  if (fp8) inputs.x_scales = in_.x_fp8_scales;
  inputs.handle = &handle;
  inputs.config = config;
  return buffer_.dispatch(inputs, ctx_.stream_options());
}

// Combine of the BF16 dispatch's own recv_x (the experts are the identity). The check passes
// recv_topk_weights too; the timed calls do not, like DeepEP's tuning loop.
CombineResult NormalModeBench::combine(const DispatchResult& fresh, const Config& config, bool with_weights) {
  CombineInputs inputs;
  inputs.x = fresh.recv_x;
  inputs.handle = fresh.handle.get();
  inputs.config = config;
  if (with_weights && fresh.recv_topk_weights) inputs.topk_weights = *fresh.recv_topk_weights;
  return buffer_.combine(inputs, ctx_.stream_options());
}

Mismatch NormalModeBench::check_full_dispatch(bool fp8, const Config& config, DispatchResult* keep) {
  DispatchResult result = full_dispatch(fp8, config);
  const Mismatch mismatch = check() ? oracle_.dispatch(ctx_.platform, result, fp8, /*fresh=*/true) : std::nullopt;
  if (keep != nullptr) *keep = std::move(result);
  return mismatch;
}

Mismatch NormalModeBench::check_cached_dispatch(bool fp8, const DispatchHandle& handle, const Config& config) {
  const DispatchResult result = cached_dispatch(fp8, handle, config);
  return check() ? oracle_.dispatch(ctx_.platform, result, fp8, /*fresh=*/false) : std::nullopt;
}

Mismatch NormalModeBench::check_combine(const DispatchResult& fresh, const Config& config) {
  const CombineResult result = combine(fresh, config, /*with_weights=*/true);
  return check() ? oracle_.combine(ctx_.platform, result, /*with_weights=*/true) : std::nullopt;
}

void NormalModeBench::report_network_bytes(const DispatchResult& fresh, const Config& combine_config) {
  const int G = buffer_.ranks_per_node();
  if (G == ctx_.ranks) return;
  const int64_t per_token =
      dispatch_bytes_per_token(int64_t(w_.hidden) * 2, 0, w_.topk, /*with_weights=*/true, ctx_.ranks);
  report_traffic(ctx_, concat(w_.label(), " dispatch bf16"), fresh.network_bytes_per_node,
                 dispatch_minimum(data_.routing, ctx_.rank, G, per_token));
  const CombineResult combined = combine(fresh, combine_config, /*with_weights=*/true);
  report_traffic(ctx_, concat(w_.label(), " combine"), combined.network_bytes_per_node,
                 combine_minimum(data_.routing, ctx_.rank, G, combine_bytes_per_row(w_.hidden, w_.topk)));
}

void NormalModeBench::at_sms(std::optional<int> num_sms) {
  const Config dispatch_config = with_sms(ctx_, default_dispatch_config(ctx_.ranks), num_sms);
  const Config combine_config = with_sms(ctx_, default_combine_config(ctx_.ranks), num_sms);
  if (num_sms) progress(ctx_, concat(w_.label(), ": normal mode, ", *num_sms, " SMs"));

  for (const bool fp8 : {false, true}) {
    measure(
        ctx_, name("dispatch", fp8, num_sms), key("dispatch", fp8, num_sms), recv_bytes(fp8),
        [&] { return check_full_dispatch(fp8, dispatch_config); }, [&] { full_dispatch(fp8, dispatch_config); });
  }
  // One checked BF16 dispatch gives the handle every cached dispatch and combine reuse.
  DispatchResult fresh;
  const bool have_handle = first_call_ok(ctx_, name("dispatch (handle)", false, num_sms),
                                         [&] { return check_full_dispatch(false, dispatch_config, &fresh); });
  if (!have_handle) return;
  report_network_bytes(fresh, combine_config);
  for (const bool fp8 : {false, true}) {
    measure(
        ctx_, name("dispatch_cached", fp8, num_sms), key("dispatch_cached", fp8, num_sms), recv_bytes(fp8),
        [&] { return check_cached_dispatch(fp8, *fresh.handle, dispatch_config); },
        [&] { cached_dispatch(fp8, *fresh.handle, dispatch_config); });
  }
  measure(
      ctx_, name("combine", false, num_sms), key("combine", false, num_sms), recv_bytes(false),
      [&] { return check_combine(fresh, combine_config); },
      [&] { combine(fresh, combine_config, /*with_weights=*/false); });
}

}  // namespace

std::optional<std::string> normal_mode_unsupported(const Limits& limits, const Workload& w, int ranks) {
  if (!limits.available || !limits.normal_mode) return "the backend has no high-throughput mode in this build";
  if (ranks > limits.max_ranks_per_node)
    return concat(ranks, " ranks in one node: the backend takes at most ", limits.max_ranks_per_node);
  if (w.topk > limits.max_topk) return concat("K = ", w.topk, ": the backend takes at most ", limits.max_topk);
  if (w.experts / ranks > limits.max_local_experts)
    return concat(w.experts / ranks, " experts per rank: the backend takes at most ", limits.max_local_experts);
  for (const DType dtype : {DType::kBFloat16, DType::kFloat8E4M3})
    if (std::find(limits.x_dtypes.begin(), limits.x_dtypes.end(), dtype) == limits.x_dtypes.end())
      return concat("x of dtype ", to_string(dtype), " is not supported by the backend");
  return std::nullopt;
}

void run_normal_mode(BenchContext& ctx, const WorkloadData& data) {
  progress(ctx, concat(data.workload.label(), ": normal mode"));
  BufferOptions options;
  options.backend = ctx.platform.backend();
  options.device = ctx.platform.device().is_cuda() ? ctx.platform.device().index : -1;
  options.num_nvl_bytes = buffer_bytes(ctx, data.workload);
  options.ranks_per_node = ctx.options.ranks_per_node;
  Buffer buffer(ctx.platform.bootstrap(), options);
  if (buffer.ranks_per_node() < ctx.ranks && ctx.rank == 0)
    ctx.report.note(concat(data.workload.label(), ": ", ctx.ranks / buffer.ranks_per_node(), " emulated nodes of ",
                           buffer.ranks_per_node(),
                           " ranks: times on emulated nodes are functional figures, not network figures"));
  {
    NormalModeBench bench(ctx, data, buffer);
    bench.layout();
    for (const std::optional<int> sms : sm_counts(ctx)) bench.at_sms(sms);
  }
  ctx.platform.synchronize();
  buffer.destroy();
}

}  // namespace epcomm::bench
