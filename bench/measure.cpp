#include "measure.hpp"

#include <cstdio>

#include "core/check.hpp"
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

std::vector<std::vector<double>> time_segments(BenchContext& ctx, int segments,
                                               const std::function<void(Stopwatch&, int)>& iteration) {
  const int total = ctx.options.warmup + ctx.options.iters;
  std::unique_ptr<Stopwatch> stopwatch = ctx.platform.stopwatch(total, segments);
  for (int i = 0; i < total; ++i) iteration(*stopwatch, i);
  std::vector<std::vector<double>> timed(segments);
  for (int s = 0; s < segments; ++s) {
    const std::vector<double> all = stopwatch->microseconds(s);
    timed[s].assign(all.begin() + ctx.options.warmup, all.end());
  }
  return timed;
}

std::vector<double> time_op(BenchContext& ctx, const std::function<void()>& op) {
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
  std::printf("  %-16s %-16s %-17s %-5s %4s  %10.1f us", key.impl.c_str(), key.workload.c_str(), key.op.c_str(),
              key.dtype.value_or("-").c_str(), key.num_sms ? std::to_string(*key.num_sms).c_str() : "-",
              row.time_us_median);
  if (row.gbps_median) std::printf("  %8.1f GB/s", *row.gbps_median);
  std::printf("\n");
  std::fflush(stdout);
}

bool measure(BenchContext& ctx, const std::string& what, const FigureKey& key, double bytes,
             const std::function<Mismatch()>& checked_call, const std::function<void()>& timed_call) {
  if (!first_call_ok(ctx, what, checked_call)) return false;
  const std::vector<double> us = time_op(ctx, timed_call);
  if (!first_call_ok(ctx, what + " (after timing)", checked_call)) return false;
  record(ctx, key, us, bytes);
  return true;
}

}  // namespace epcomm::bench
