// The measurement protocol shared by every mode: check the first call, then time warm-up + N
// iterations (L2 flushed and ranks lined up before each timed section), then gather each rank's
// median to rank 0 as one Row.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "options.hpp"
#include "oracle.hpp"
#include "platform.hpp"
#include "report.hpp"
#include "workload.hpp"

namespace epcomm::bench {

struct BenchContext {
  const Options& options;
  Platform& platform;
  Report& report;  // rows are added on rank 0 only
  int rank = 0;
  int ranks = 1;
  int failures = 0;                 // configurations whose check failed (same count on every rank)
  bool kernel_clock_noted = false;  // the note saying why there are no kernel rows was written

  StreamOptions stream_options() const {
    StreamOptions so;
    so.stream = platform.stream();
    so.allocator = &platform.allocator();
    return so;
  }
  LowLatencyOptions low_latency_options(bool return_recv_hook) const {
    LowLatencyOptions lo;
    lo.stream = platform.stream();
    lo.allocator = &platform.allocator();
    lo.return_recv_hook = return_recv_hook;
    return lo;
  }
  FigureKey key(const Workload& w, const std::string& impl, const std::string& op, std::optional<std::string> dtype,
                std::optional<int> num_sms) const;
};

// Runs `first` (one call plus, when options.check, its comparison with the oracle) on every rank and
// agrees on the outcome. False on every rank when any rank's result was wrong (counted in
// ctx.failures, no figure may be recorded). Errors propagate (what the backend does not support is
// skipped before, from its Limits).
bool first_call_ok(BenchContext& ctx, const std::string& what, const std::function<Mismatch()>& first);

// Microseconds of the timed iterations of one section: CUDA-event (or host clock) spans, and the
// summed kernel durations of each call (empty when there is no kernel clock: the CPU backend, no
// CUPTI, --no-kernel-time). Whether kernel_us is empty is the same on every rank.
struct SegmentTimes {
  std::vector<double> event_us;
  std::vector<double> kernel_us;
};

// Times `op` (warm-up, then options.iters iterations), each call preceded by an L2 flush and an
// alignment of all ranks.
SegmentTimes time_op(BenchContext& ctx, const std::function<void()>& op);

// Times `iteration`, which marks `segments` sections with the stopwatch and calls
// ctx.platform.flush_cache() / align() itself; timed iterations only. With a kernel clock the
// iterations run a second time with tracing on for the kernel durations, so that the tracing
// never adds to the event spans.
std::vector<SegmentTimes> time_segments(BenchContext& ctx, int segments,
                                        const std::function<void(Stopwatch&, int)>& iteration);

// One figure: `checked_call` (one call compared with the oracle) runs before and after `timed_call`
// is timed, so neither a wrong first result nor state spoiled by the repeated calls goes unseen;
// the figure is recorded only when both checks pass on every rank. Returns whether it was.
bool measure(BenchContext& ctx, const std::string& what, const FigureKey& key, double bytes,
             const std::function<Mismatch()>& checked_call, const std::function<void()>& timed_call);

// Collective: gathers this rank's median (and logical bytes, < 0 when not defined) and adds the row on rank 0.
void record(BenchContext& ctx, const FigureKey& key, const std::vector<double>& microseconds, double bytes);
// The event row and, when measured, the kernel row ("timing": "kernel") of one figure.
void record(BenchContext& ctx, const FigureKey& key, const SegmentTimes& times, double bytes);

// Progress on rank 0 (stdout, flushed), so a long GPU run shows where it is.
void progress(const BenchContext& ctx, const std::string& line);

}  // namespace epcomm::bench
