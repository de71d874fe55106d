// The results of a run: one Row per figure, printed as a table on rank 0 and written as the JSON
// rows of BENCHMARKS.md "Recording results".
#pragma once

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "stats.hpp"

namespace epcomm::bench {

struct RunInfo {
  std::string date;     // UTC, ISO 8601
  std::string machine;  // "8x NVIDIA H200"
  std::string commit;   // $EPCOMM_COMMIT, else the build's `git rev-parse --short HEAD`
};

// What a figure is: everything of a row except the measured numbers.
struct FigureKey {
  std::string impl;                  // "epcomm" | "nccl_all_to_all"
  std::string workload;              // Workload::label()
  std::string op;                    // "dispatch_cached", "ll_combine", ...
  std::optional<std::string> dtype;  // "bf16" | "fp8"; none where not applicable (layout)
  std::optional<int> num_sms;        // none where the caller does not choose it (CPU, low-latency, layout, NCCL)
  std::string timing = "event";      // "event": CUDA-event / host-clock span; "kernel": summed kernel durations
  int ranks = 0, tokens = 0, hidden = 0, topk = 0, experts = 0;
};

struct Row {
  FigureKey key;
  // Over ranks, of each rank's median over iterations.
  double time_us_median = 0, time_us_min = 0, time_us_max = 0;
  std::optional<double> gbps_median, gbps_min, gbps_max;
};

Row summarize(const FigureKey& key, const std::vector<RankFigure>& per_rank);

class Report {
 public:
  explicit Report(RunInfo info) : info_(std::move(info)) {}
  // Rows are written to `path` (truncated now) as they are added, so a run stopped half-way keeps
  // the figures it has. Throws epcomm::Error when the file cannot be written.
  void open_json(const std::string& path);
  void add(const Row& row);
  void note(const std::string& line) { notes_.push_back(line); }
  const std::vector<Row>& rows() const { return rows_; }
  const RunInfo& info() const { return info_; }

  void print_table(std::FILE* out) const;
  static std::string json_row(const RunInfo& info, const Row& row);

 private:
  const Row* baseline_for(const Row& row) const;
  void print_speedups(std::FILE* out) const;

  RunInfo info_;
  std::string json_path_;
  std::vector<Row> rows_;
  std::vector<std::string> notes_;
};

// "2025-11-22T11:14:00Z"
std::string utc_now();
// $EPCOMM_COMMIT, else the commit baked in at build time.
std::string commit_id();

}  // namespace epcomm::bench
