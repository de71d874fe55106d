// The NCCL all-to-all baseline, timed and checked like epcomm's calls, in the same run.
#include "baseline.hpp"
#include "core/check.hpp"
#include "modes.hpp"

namespace epcomm::bench {

void run_nccl_baseline(BenchContext& ctx, const WorkloadData& data) {
  const Workload& w = data.workload;
  Platform& p = ctx.platform;
  progress(ctx, concat(w.label(), ": NCCL all_to_all baseline"));
  const Tensor x = p.upload(DType::kBFloat16, {w.tokens, w.hidden}, data.x_bf16.data());
  const Tensor topk_idx = p.upload(DType::kInt64, {w.tokens, w.topk}, data.topk_idx.data());
  const std::unique_ptr<AllToAllBaseline> baseline = make_nccl_baseline(p, x, topk_idx, w.experts);
  const Oracle oracle(w, data.routing, data.values, ctx.rank);
  const double bytes = double(data.recv_tokens) * w.hidden * 2;
  const std::string impl = "nccl_all_to_all";
  const std::optional<std::string> bf16 = std::string("bf16");

  const bool dispatched = first_call_ok(ctx, concat(w.label(), " nccl dispatch"), [&]() -> Mismatch {
    baseline->dispatch();
    return ctx.options.check ? oracle.baseline_dispatch(p, baseline->recv_x()) : std::nullopt;
  });
  if (!dispatched) return;
  record(ctx, ctx.key(w, impl, "dispatch", bf16, std::nullopt), time_op(ctx, [&] { baseline->dispatch(); }), bytes);
  record(ctx, ctx.key(w, impl, "dispatch_cached", bf16, std::nullopt),
         time_op(ctx, [&] { baseline->dispatch_cached(); }), bytes);
  const bool combined = first_call_ok(ctx, concat(w.label(), " nccl combine"), [&]() -> Mismatch {
    baseline->combine();
    return ctx.options.check ? oracle.baseline_combine(p, baseline->combined_x()) : std::nullopt;
  });
  if (combined)
    record(ctx, ctx.key(w, impl, "combine", bf16, std::nullopt), time_op(ctx, [&] { baseline->combine(); }), bytes);
  p.synchronize();
}

}  // namespace epcomm::bench
