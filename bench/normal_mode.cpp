// Normal (high-throughput) mode: get_dispatch_layout, the full non-cached dispatch (layout + notify
// + host wait + dispatch), the cached dispatch (BF16 and FP8) and the combine, per SM count.
#include <algorithm>

#include "core/check.hpp"
#include "modes.hpp"

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

Config with_sms(Config config, std::optional<int> num_sms) {
  if (num_sms) config.num_sms = *num_sms;
  return config;
}

int64_t buffer_bytes(const BenchContext& ctx, const Workload& w) {
  int64_t bytes = 0;
  for (const std::optional<int> sms : sm_counts(ctx)) {
    const int64_t hidden_bytes = int64_t(w.hidden) * 2;  // the BF16 size, for FP8 too
    bytes = std::max(bytes,
                     with_sms(default_dispatch_config(ctx.ranks), sms).nvl_buffer_size_hint(hidden_bytes, ctx.ranks));
    bytes =
        std::max(bytes, with_sms(default_combine_config(ctx.ranks), sms).nvl_buffer_size_hint(hidden_bytes, ctx.ranks));
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
        oracle_(w_, data.routing, data.values, ctx.rank) {}

  void layout();
  void at_sms(std::optional<int> num_sms);

 private:
  LayoutResult run_layout() { return buffer_.get_dispatch_layout(in_.topk_idx, w_.experts, ctx_.stream_options()); }
  DispatchResult full_dispatch(bool fp8, const Config& config);
  DispatchResult cached_dispatch(bool fp8, const DispatchHandle& handle, const Config& config);
  bool first_full_dispatch(bool fp8, const Config& config, std::optional<int> num_sms, DispatchResult& result);
  void time_full_dispatch(bool fp8, const Config& config, std::optional<int> num_sms);
  void time_cached_dispatch(bool fp8, const DispatchHandle& handle, const Config& config, std::optional<int> num_sms);
  void time_combine(const DispatchResult& fresh, const Config& config, std::optional<int> num_sms);

  double recv_bytes(bool fp8) const {
    const int64_t per_token = fp8 ? w_.hidden + w_.hidden / 128 * 4 : int64_t(w_.hidden) * 2;
    return double(data_.recv_tokens) * double(per_token);
  }
  static std::string dtype(bool fp8) { return fp8 ? "fp8" : "bf16"; }
  std::string name(const std::string& op, bool fp8, std::optional<int> sms) const {
    return concat(w_.label(), " ", op, " ", dtype(fp8), sms ? concat(" @ ", *sms, " SMs") : std::string());
  }

  BenchContext& ctx_;
  const WorkloadData& data_;
  const Workload& w_;
  Buffer& buffer_;
  NormalInputs in_;
  Oracle oracle_;
};

void NormalModeBench::layout() {
  const bool ok = first_call_ok(ctx_, concat(w_.label(), " layout"), [&]() -> Mismatch {
    const LayoutResult result = run_layout();
    return ctx_.options.check ? oracle_.layout(ctx_.platform, result) : std::nullopt;
  });
  if (ok)
    record(ctx_, ctx_.key(w_, "epcomm", "layout", std::nullopt, std::nullopt), time_op(ctx_, [&] { run_layout(); }),
           -1);
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

bool NormalModeBench::first_full_dispatch(bool fp8, const Config& config, std::optional<int> num_sms,
                                          DispatchResult& result) {
  return first_call_ok(ctx_, name("dispatch", fp8, num_sms), [&]() -> Mismatch {
    result = full_dispatch(fp8, config);
    return ctx_.options.check ? oracle_.dispatch(ctx_.platform, result, fp8, /*fresh=*/true) : std::nullopt;
  });
}

void NormalModeBench::time_full_dispatch(bool fp8, const Config& config, std::optional<int> num_sms) {
  const std::vector<double> us = time_op(ctx_, [&] { full_dispatch(fp8, config); });
  record(ctx_, ctx_.key(w_, "epcomm", "dispatch", dtype(fp8), num_sms), us, recv_bytes(fp8));
}

void NormalModeBench::time_cached_dispatch(bool fp8, const DispatchHandle& handle, const Config& config,
                                           std::optional<int> num_sms) {
  const bool ok = first_call_ok(ctx_, name("dispatch_cached", fp8, num_sms), [&]() -> Mismatch {
    const DispatchResult result = cached_dispatch(fp8, handle, config);
    return ctx_.options.check ? oracle_.dispatch(ctx_.platform, result, fp8, /*fresh=*/false) : std::nullopt;
  });
  if (!ok) return;
  const std::vector<double> us = time_op(ctx_, [&] { cached_dispatch(fp8, handle, config); });
  record(ctx_, ctx_.key(w_, "epcomm", "dispatch_cached", dtype(fp8), num_sms), us, recv_bytes(fp8));
}

// Combine of the BF16 dispatch's own recv_x (the experts are the identity). The check passes
// recv_topk_weights too; the timed calls do not, like DeepEP's tuning loop.
void NormalModeBench::time_combine(const DispatchResult& fresh, const Config& config, std::optional<int> num_sms) {
  CombineInputs inputs;
  inputs.x = fresh.recv_x;
  inputs.handle = fresh.handle.get();
  inputs.config = config;
  const bool ok = first_call_ok(ctx_, name("combine", false, num_sms), [&]() -> Mismatch {
    CombineInputs checked = inputs;
    if (fresh.recv_topk_weights) checked.topk_weights = *fresh.recv_topk_weights;
    const CombineResult result = buffer_.combine(checked, ctx_.stream_options());
    return ctx_.options.check ? oracle_.combine(ctx_.platform, result, /*with_weights=*/true) : std::nullopt;
  });
  if (!ok) return;
  const std::vector<double> us = time_op(ctx_, [&] { buffer_.combine(inputs, ctx_.stream_options()); });
  record(ctx_, ctx_.key(w_, "epcomm", "combine", std::string("bf16"), num_sms), us, recv_bytes(false));
}

void NormalModeBench::at_sms(std::optional<int> num_sms) {
  const Config dispatch_config = with_sms(default_dispatch_config(ctx_.ranks), num_sms);
  const Config combine_config = with_sms(default_combine_config(ctx_.ranks), num_sms);
  if (num_sms) progress(ctx_, concat(w_.label(), ": normal mode, ", *num_sms, " SMs"));

  // The checked first BF16 dispatch also gives the handle every cached dispatch and combine reuse.
  DispatchResult fresh, fresh_fp8;
  const bool have_handle = first_full_dispatch(false, dispatch_config, num_sms, fresh);
  if (have_handle) time_full_dispatch(false, dispatch_config, num_sms);
  if (first_full_dispatch(true, dispatch_config, num_sms, fresh_fp8))
    time_full_dispatch(true, dispatch_config, num_sms);
  fresh_fp8 = {};
  if (!have_handle) return;
  time_cached_dispatch(false, *fresh.handle, dispatch_config, num_sms);
  time_cached_dispatch(true, *fresh.handle, dispatch_config, num_sms);
  time_combine(fresh, combine_config, num_sms);
}

}  // namespace

void run_normal_mode(BenchContext& ctx, const WorkloadData& data) {
  progress(ctx, concat(data.workload.label(), ": normal mode"));
  BufferOptions options;
  options.backend = ctx.platform.backend();
  options.device = ctx.platform.device().is_cuda() ? ctx.platform.device().index : -1;
  options.num_nvl_bytes = buffer_bytes(ctx, data.workload);
  Buffer buffer(ctx.platform.bootstrap(), options);
  {
    NormalModeBench bench(ctx, data, buffer);
    bench.layout();
    for (const std::optional<int> sms : sm_counts(ctx)) bench.at_sms(sms);
  }
  ctx.platform.synchronize();
  buffer.destroy();
}

}  // namespace epcomm::bench
