#include "measure.hpp"

#include <cstdio>

#include "core/check.hpp"
#include "kernel_clock.hpp"
#include "stats.hpp"

namespace epcomm::bench {
namespace {

enum FirstCallStatus : int { kPassed = 0, kWrong = 1 };

}  // namespace

FigureKey BenchContext::key(const Workload& w, const std::string& impl, const std::string& op,
                            std::optional<std::string> dtype, std::optional<int> num_sms) const {
  FigureKey k;
  k.impl = impl;
  k.workload = w.label();
  k.op = op;
  k.dtype = std::move(dtype);
  k.num_sms = num_sms;
  k.ranks = ranks;
  k.tokens = w.tokens;
  k.hidden = w.hidden;
  k.topk = w.topk;
  k.experts = w.experts;
  return k;
}

void progress(const BenchContext& ctx, const std::string& line) {
  if (ctx.rank != 0) return;
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

bool first_call_ok(BenchContext& ctx, const std::string& what, const std::function<Mismatch()>& first) {
  // What the backend does not support is skipped before (run_mode asks its Limits): an error here is real.
  int status = kPassed;
  const Mismatch mismatch = first();
  if (mismatch && ctx.options.check) status = kWrong;
  const int worst = max_over_ranks(ctx.platform.bootstrap(), status);
  if (status == kWrong) std::fprintf(stderr, "CHECK FAILED: %s: %s\n", what.c_str(), mismatch->c_str());
  if (worst == kWrong) {
    ++ctx.failures;
    if (ctx.rank == 0) ctx.report.note(concat(what, ": CHECK FAILED, no figure recorded (see the ranks' messages)"));
  }
  return worst == kPassed;
}

namespace {

// The kernel clock when every rank has one (else nullptr, noted once on CUDA).
KernelClock* shared_kernel_clock(BenchContext& ctx) {
  std::string why_not = "--no-kernel-time";
  KernelClock* clock = ctx.options.kernel_time ? ctx.platform.kernels(why_not) : nullptr;
  const bool everywhere = all_ranks_agree(ctx.platform.bootstrap(), clock != nullptr);
  if (!everywhere && !ctx.kernel_clock_noted && ctx.platform.backend() == BackendKind::kCuda) {
    ctx.kernel_clock_noted = true;
    if (ctx.rank == 0)
      ctx.report.note(concat("no kernel-time rows: ", clock != nullptr ? "a rank has no kernel clock" : why_not));
  }
  return everywhere ? clock : nullptr;
}

// The same iterations with the kernel clock tracing; fills kernel_us of every segment whose calls
// all launched kernels on every rank.
void time_kernels(BenchContext& ctx, KernelClock& clock, int segments,
                  const std::function<void(Stopwatch&, int)>& iteration, std::vector<SegmentTimes>& timed) {
  const int total = ctx.options.warmup + ctx.options.iters;
  KernelStopwatch stopwatch(clock, total, segments);
  clock.enable();
  for (int i = 0; i < total; ++i) iteration(stopwatch, i);
  ctx.platform.synchronize();
  clock.disable();
  for (int s = 0; s < segments; ++s) {
    const bool complete = all_ranks_agree(ctx.platform.bootstrap(), stopwatch.complete(s, ctx.options.warmup));
    if (!complete) continue;
    const std::vector<double> all = stopwatch.microseconds(s);
    timed[s].kernel_us.assign(all.begin() + ctx.options.warmup, all.end());
  }
}

}  // namespace

std::vector<SegmentTimes> time_segments(BenchContext& ctx, int segments,
                                        const std::function<void(Stopwatch&, int)>& iteration) {
  const int total = ctx.options.warmup + ctx.options.iters;
  std::unique_ptr<Stopwatch> stopwatch = ctx.platform.stopwatch(total, segments);
  for (int i = 0; i < total; ++i) iteration(*stopwatch, i);
  std::vector<SegmentTimes> timed(segments);
  for (int s = 0; s < segments; ++s) {
    const std::vector<double> all = stopwatch->microseconds(s);
    timed[s].event_us.assign(all.begin() + ctx.options.warmup, all.end());
  }
  if (KernelClock* clock = shared_kernel_clock(ctx)) time_kernels(ctx, *clock, segments, iteration, timed);
  return timed;
}

SegmentTimes time_op(BenchContext& ctx, const std::function<void()>& op) {
  return time_segments(ctx, 1, [&](Stopwatch& stopwatch, int i) {
    ctx.platform.flush_cache();
    ctx.platform.align();
    stopwatch.start(i, 0);
    op();
    stopwatch.stop(i, 0);
  })[0];
}

void record(BenchContext& ctx, const FigureKey& key, const std::vector<double>& microseconds, double bytes) {
  const RankFigure mine{median(microseconds), bytes};
  const std::vector<RankFigure> all = gather_figures(ctx.platform.bootstrap(), mine);
  if (ctx.rank != 0) return;
  const Row row = summarize(key, all);
  ctx.report.add(row);
  std::printf("  %-16s %-16s %-17s %-5s %4s %-6s %10.1f us", key.impl.c_str(), key.workload.c_str(), key.op.c_str(),
              key.dtype.value_or("-").c_str(), key.num_sms ? std::to_string(*key.num_sms).c_str() : "-",
              key.timing.c_str(), row.time_us_median);
  if (row.gbps_median) std::printf("  %8.1f GB/s", *row.gbps_median);
  std::printf("\n");
  std::fflush(stdout);
}

void record(BenchContext& ctx, const FigureKey& key, const SegmentTimes& times, double bytes) {
  record(ctx, key, times.event_us, bytes);
  if (times.kernel_us.empty()) return;
  FigureKey kernel_key = key;
  kernel_key.timing = "kernel";
  record(ctx, kernel_key, times.kernel_us, bytes);
}

bool measure(BenchContext& ctx, const std::string& what, const FigureKey& key, double bytes,
             const std::function<Mismatch()>& checked_call, const std::function<void()>& timed_call) {
  if (!first_call_ok(ctx, what, checked_call)) return false;
  const SegmentTimes us = time_op(ctx, timed_call);
  if (!first_call_ok(ctx, what + " (after timing)", checked_call)) return false;
  record(ctx, key, us, bytes);
  return true;
}

}  // namespace epcomm::bench
