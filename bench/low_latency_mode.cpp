// Low-latency mode: kernel time of low_latency_dispatch (FP8 cast in the kernel, and BF16) and of
// low_latency_combine, and the receive-hook split (send part, receive part) of both.
#include "core/check.hpp"
#include "modes.hpp"

namespace epcomm::bench {
namespace {

class LowLatencyBench {
 public:
  LowLatencyBench(BenchContext& ctx, const WorkloadData& data, Buffer& buffer)
      : ctx_(ctx), data_(data), w_(data.workload), buffer_(buffer), oracle_(w_, data.routing, data.values, ctx.rank) {
    Platform& p = ctx.platform;
    x_ = p.upload(DType::kBFloat16, {w_.tokens, w_.hidden}, data.x_bf16.data());
    topk_idx_ = p.upload(DType::kInt64, {w_.tokens, w_.topk}, data.topk_idx.data());
    topk_weights_ = p.upload(DType::kFloat32, {w_.tokens, w_.topk}, data.topk_weights.data());
  }

  bool check_bf16_round_trip();
  void time_round_trip(bool fp8, bool record_combine);
  void time_hook_split();

 private:
  LowLatencyDispatchResult dispatch(bool fp8, bool hook);
  LowLatencyCombineResult combine(const LowLatencyHandle& handle, bool hook);
  Mismatch check_round_trip(bool fp8, bool hook);
  bool checked_timing(const std::string& what, bool fp8, bool hook, int segments,
                      const std::function<void(Stopwatch&, int)>& iteration, std::vector<SegmentTimes>& us);
  bool check() const { return ctx_.options.check; }
  std::string name(const std::string& what) const { return concat(w_.label(), " ", what); }
  // Logical bytes of BENCHMARKS.md: per (token, non -1 slot) of this rank.
  double dispatch_bytes(bool fp8) const {
    const int64_t per_slot = fp8 ? w_.hidden + w_.hidden / 128 * 4 + 16 : int64_t(w_.hidden) * 2;
    return double(data_.selections) * double(per_slot);
  }
  double combine_bytes() const { return double(data_.selections) * double(w_.hidden) * 2; }

  BenchContext& ctx_;
  const WorkloadData& data_;
  const Workload& w_;
  Buffer& buffer_;
  Oracle oracle_;
  Tensor x_, topk_idx_, topk_weights_;
  // Input of every combine: a copy of the checked BF16 dispatch's recv_x, i.e. identity experts.
  // Every dispatch of the same routing puts the rows in the same places, so it fits any handle.
  Tensor expert_out_;
};

LowLatencyDispatchResult LowLatencyBench::dispatch(bool fp8, bool hook) {
  LowLatencyDispatchInputs inputs;
  inputs.x = x_;
  inputs.topk_idx = topk_idx_;
  inputs.num_max_dispatch_tokens_per_rank = w_.tokens;
  inputs.num_experts = w_.experts;
  inputs.use_fp8 = fp8;
  return buffer_.low_latency_dispatch(inputs, ctx_.low_latency_options(hook));
}

LowLatencyCombineResult LowLatencyBench::combine(const LowLatencyHandle& handle, bool hook) {
  LowLatencyCombineInputs inputs;
  inputs.x = expert_out_;
  inputs.topk_idx = topk_idx_;
  inputs.topk_weights = topk_weights_;
  inputs.handle = &handle;
  return buffer_.low_latency_combine(inputs, ctx_.low_latency_options(hook));
}

bool LowLatencyBench::check_bf16_round_trip() {
  progress(ctx_, concat(w_.label(), ": low-latency mode"));
  return first_call_ok(ctx_, name("ll_dispatch bf16 + ll_combine"), [&]() -> Mismatch {
    const LowLatencyDispatchResult d = dispatch(false, false);
    if (check())
      if (Mismatch m = oracle_.low_latency_dispatch(ctx_.platform, d, false)) return m;
    expert_out_ = ctx_.platform.clone(d.recv_x);
    const LowLatencyCombineResult c = combine(d.handle, false);
    return check() ? oracle_.low_latency_combine(ctx_.platform, c) : std::nullopt;
  });
}

// One dispatch and one combine of its handle, both compared with the oracle; through the receive
// hooks when `hook` (all ranks line up first, so each hook finds its data arrived).
Mismatch LowLatencyBench::check_round_trip(bool fp8, bool hook) {
  Platform& p = ctx_.platform;
  LowLatencyDispatchResult d = dispatch(fp8, hook);
  if (hook) {
    if (!d.hook) return concat("rank ", ctx_.rank, ": low_latency_dispatch(return_recv_hook) returned no hook");
    p.align();
    d.hook(p.stream());
  }
  if (check())
    if (Mismatch m = oracle_.low_latency_dispatch(p, d, fp8)) return m;
  LowLatencyCombineResult c = combine(d.handle, hook);
  if (hook) {
    if (!c.hook) return concat("rank ", ctx_.rank, ": low_latency_combine(return_recv_hook) returned no hook");
    p.align();
    c.hook(p.stream());
  }
  return check() ? oracle_.low_latency_combine(p, c) : std::nullopt;
}

// Times `iteration` between a check of the round trip before and one after (state left by the
// repeated calls); false when either fails.
bool LowLatencyBench::checked_timing(const std::string& what, bool fp8, bool hook, int segments,
                                     const std::function<void(Stopwatch&, int)>& iteration,
                                     std::vector<SegmentTimes>& us) {
  if (!first_call_ok(ctx_, name(what), [&] { return check_round_trip(fp8, hook); })) return false;
  us = time_segments(ctx_, segments, iteration);
  return first_call_ok(ctx_, name(what + " (after timing)"), [&] { return check_round_trip(fp8, hook); });
}

// Dispatch then combine in each iteration (a combine needs the handle of a dispatch), each call
// timed on its own after an L2 flush and an alignment of the ranks.
void LowLatencyBench::time_round_trip(bool fp8, bool record_combine) {
  const std::string dtype = fp8 ? "fp8" : "bf16";
  Platform& p = ctx_.platform;
  std::vector<SegmentTimes> us;
  const bool ok = checked_timing(
      concat("ll_dispatch ", dtype, " + ll_combine"), fp8, /*hook=*/false, 2,
      [&](Stopwatch& stopwatch, int i) {
        p.flush_cache();
        p.align();
        stopwatch.start(i, 0);
        const LowLatencyDispatchResult d = dispatch(fp8, false);
        stopwatch.stop(i, 0);
        p.flush_cache();
        p.align();
        stopwatch.start(i, 1);
        combine(d.handle, false);
        stopwatch.stop(i, 1);
      },
      us);
  if (!ok) return;
  record(ctx_, ctx_.key(w_, "epcomm", "ll_dispatch", dtype, std::nullopt), us[0], dispatch_bytes(fp8));
  if (record_combine)
    record(ctx_, ctx_.key(w_, "epcomm", "ll_combine", std::string("bf16"), std::nullopt), us[1], combine_bytes());
}

// return_recv_hook: the call issues the sends, the hook the receive half. Between the two every rank
// waits for all ranks' send parts to finish (align), so the receive part finds its data arrived,
// as it would behind overlapped compute; the two parts are timed separately.
void LowLatencyBench::time_hook_split() {
  Platform& p = ctx_.platform;
  std::vector<SegmentTimes> us;
  const bool ok = checked_timing(
      "ll hook split fp8", /*fp8=*/true, /*hook=*/true, 4,
      [&](Stopwatch& stopwatch, int i) {
        p.flush_cache();
        p.align();
        stopwatch.start(i, 0);
        LowLatencyDispatchResult d = dispatch(true, true);
        stopwatch.stop(i, 0);
        p.align();
        stopwatch.start(i, 1);
        d.hook(p.stream());
        stopwatch.stop(i, 1);
        p.flush_cache();
        p.align();
        stopwatch.start(i, 2);
        LowLatencyCombineResult c = combine(d.handle, true);
        stopwatch.stop(i, 2);
        p.align();
        stopwatch.start(i, 3);
        c.hook(p.stream());
        stopwatch.stop(i, 3);
      },
      us);
  if (!ok) return;
  const char* ops[] = {"ll_dispatch_send", "ll_dispatch_recv", "ll_combine_send", "ll_combine_recv"};
  for (int s = 0; s < 4; ++s)
    record(ctx_, ctx_.key(w_, "epcomm", ops[s], std::string(s < 2 ? "fp8" : "bf16"), std::nullopt), us[s], -1);
}

// The same events around a kernel that does nothing: what any figure above contains besides the
// kernels' own work (the start of a kernel, the events).
void note_timing_floor(BenchContext& ctx, const Workload& w) {
  if (ctx.platform.backend() != BackendKind::kCuda) return;
  const SegmentTimes us = time_op(ctx, [&] { ctx.platform.empty_kernel(); });
  if (ctx.rank == 0)
    ctx.report.note(concat(w.label(), ": timing floor (an empty kernel between the same events): median ",
                           median(us.event_us), " us", us.kernel_us.empty() ? "" : "; its kernel time: ",
                           us.kernel_us.empty() ? std::string() : concat(median(us.kernel_us), " us")));
}

}  // namespace

std::optional<std::string> low_latency_mode_unsupported(const Limits& limits, const Workload& w, int ranks) {
  if (!limits.available || !limits.low_latency_mode) return "the backend has no low-latency mode in this build";
  if (ranks > limits.max_ranks) return concat(ranks, " ranks: the backend takes at most ", limits.max_ranks);
  if (w.tokens > limits.max_low_latency_tokens_per_rank)
    return concat("T_max = ", w.tokens, ": the backend takes at most ", limits.max_low_latency_tokens_per_rank);
  if (w.experts > limits.max_low_latency_experts)
    return concat("E = ", w.experts, ": the backend takes at most ", limits.max_low_latency_experts);
  if (w.topk > limits.max_low_latency_topk)
    return concat("K = ", w.topk, ": the backend takes at most ", limits.max_low_latency_topk);
  if (w.hidden % limits.low_latency_hidden_multiple != 0)
    return concat("hidden = ", w.hidden, " is not a multiple of ", limits.low_latency_hidden_multiple);
  return std::nullopt;
}

void run_low_latency_mode(BenchContext& ctx, const WorkloadData& data) {
  const Workload& w = data.workload;
  BufferOptions options;
  options.backend = ctx.platform.backend();
  options.device = ctx.platform.device().is_cuda() ? ctx.platform.device().index : -1;
  options.low_latency_mode = true;
  options.num_rdma_bytes = low_latency_buffer_size_hint(w.tokens, w.hidden, ctx.ranks, w.experts);
  Buffer buffer(ctx.platform.bootstrap(), options);
  {
    LowLatencyBench bench(ctx, data, buffer);
    if (bench.check_bf16_round_trip()) {
      bench.time_round_trip(/*fp8=*/true, /*record_combine=*/true);
      if (w.low_latency_bf16) bench.time_round_trip(/*fp8=*/false, /*record_combine=*/false);
      bench.time_hook_split();
    }
    note_timing_floor(ctx, w);
  }
  ctx.platform.synchronize();
  buffer.destroy();
}

}  // namespace epcomm::bench
