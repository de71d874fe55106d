#include "report.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>

#include "core/check.hpp"
#include "core/environment.hpp"
#include "stats.hpp"

namespace epcomm::bench {

const char* build_commit();  // generated at build time (commit.cpp.in)

namespace {

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\')
      out += concat('\\', c);
    else if (static_cast<unsigned char>(c) < 0x20)
      out += ' ';
    else
      out += c;
  }
  return out + "\"";
}

std::string json_number(double value, int decimals) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.*f", decimals, value);
  return text;
}

template <class T, class F>
std::string json_optional(const std::optional<T>& value, F&& format) {
  return value ? format(*value) : std::string("null");
}

std::string sms_text(const std::optional<int>& num_sms) { return num_sms ? std::to_string(*num_sms) : "-"; }

// The baseline figure a row of epcomm is compared with: same workload, the matching operation.
// Normal mode compares like with like (BF16 with BF16); low-latency dispatch, FP8 or BF16, is
// compared with the BF16 baseline because that is what a user without the library sends.
std::optional<std::string> baseline_op(const Row& row) {
  const std::string& op = row.key.op;
  const bool bf16 = row.key.dtype && *row.key.dtype == "bf16";
  if ((op == "dispatch" || op == "dispatch_cached") && bf16) return op;
  if (op == "combine") return op;
  if (op == "ll_dispatch") return std::string("dispatch");
  if (op == "ll_combine") return std::string("combine");
  return std::nullopt;
}

const Row* find_row(const std::vector<Row>& rows, const std::string& impl, const std::string& workload,
                    const std::string& op, const std::optional<std::string>& dtype, const std::optional<int>& num_sms,
                    const std::string& timing) {
  for (const Row& row : rows) {
    if (row.key.impl == impl && row.key.workload == workload && row.key.op == op && row.key.dtype == dtype &&
        row.key.num_sms == num_sms && row.key.timing == timing)
      return &row;
  }
  return nullptr;
}

}  // namespace

Row summarize(const FigureKey& key, const std::vector<RankFigure>& per_rank) {
  Row row;
  row.key = key;
  std::vector<double> times, rates;
  for (const RankFigure& figure : per_rank) {
    times.push_back(figure.median_us);
    if (figure.gbps() >= 0) rates.push_back(figure.gbps());
  }
  row.time_us_median = median(times);
  row.time_us_min = *std::min_element(times.begin(), times.end());
  row.time_us_max = *std::max_element(times.begin(), times.end());
  if (!rates.empty() && rates.size() == per_rank.size()) {
    row.gbps_median = median(rates);
    row.gbps_min = *std::min_element(rates.begin(), rates.end());
    row.gbps_max = *std::max_element(rates.begin(), rates.end());
  }
  return row;
}

const Row* Report::baseline_for(const Row& row) const {
  if (row.key.impl != "epcomm") return nullptr;
  const std::optional<std::string> op = baseline_op(row);
  if (!op) return nullptr;
  return find_row(rows_, "nccl_all_to_all", row.key.workload, *op, std::string("bf16"), std::nullopt, row.key.timing);
}

void Report::print_table(std::FILE* out) const {
  std::fprintf(out, "\nepcomm-bench  %s  %s  commit %s\n", info_.date.c_str(), info_.machine.c_str(),
               info_.commit.c_str());
  std::fprintf(out,
               "times: median over iterations on each rank, then min / median / max over ranks; "
               "GB/s: logical bytes received (BENCHMARKS.md), median over ranks\n\n");
  std::fprintf(out, "%-16s %-16s %-17s %-5s %4s %-6s %10s %8s %29s %17s %11s %8s\n", "impl", "workload", "op", "dtype",
               "SMs", "timing", "time_us", "GB/s", "rank time_us min/med/max", "GB/s min/max", "baseline_us",
               "speedup");
  for (const Row& row : rows_) {
    char per_rank[64], rate_range[48] = "-", rate[24] = "-", base[24] = "-", speedup[24] = "-";
    std::snprintf(per_rank, sizeof(per_rank), "%.1f / %.1f / %.1f", row.time_us_min, row.time_us_median,
                  row.time_us_max);
    if (row.gbps_median) {
      std::snprintf(rate, sizeof(rate), "%.1f", *row.gbps_median);
      std::snprintf(rate_range, sizeof(rate_range), "%.1f / %.1f", *row.gbps_min, *row.gbps_max);
    }
    if (const Row* baseline = baseline_for(row)) {
      std::snprintf(base, sizeof(base), "%.1f", baseline->time_us_median);
      std::snprintf(speedup, sizeof(speedup), "%.2fx", baseline->time_us_median / row.time_us_median);
    }
    std::fprintf(out, "%-16s %-16s %-17s %-5s %4s %-6s %10.1f %8s %29s %17s %11s %8s\n", row.key.impl.c_str(),
                 row.key.workload.c_str(), row.key.op.c_str(), row.key.dtype.value_or("-").c_str(),
                 sms_text(row.key.num_sms).c_str(), row.key.timing.c_str(), row.time_us_median, rate, per_rank,
                 rate_range, base, speedup);
  }
  print_speedups(out);
  for (const std::string& line : notes_) std::fprintf(out, "note: %s\n", line.c_str());
  std::fflush(out);
}

// The pairs BENCHMARKS.md's targets are stated for: (cached) dispatch + combine, and the low-latency
// round trip, each against the baseline's dispatch + combine from the same run.
void Report::print_speedups(std::FILE* out) const {
  bool header = false;
  auto line = [&](const std::string& what, double ours, const Row* base_dispatch, const Row* base_combine) {
    if (!base_dispatch || !base_combine) return;
    if (!header) std::fprintf(out, "\nagainst the NCCL all_to_all baseline (dispatch + combine, same run):\n");
    header = true;
    const double theirs = base_dispatch->time_us_median + base_combine->time_us_median;
    std::fprintf(out, "  %-58s %9.1f us vs %9.1f us: %.2fx\n", what.c_str(), ours, theirs, theirs / ours);
  };
  const std::string nccl = "nccl_all_to_all";
  const std::optional<std::string> bf16 = std::string("bf16"), fp8 = std::string("fp8");
  for (const Row& row : rows_) {
    if (row.key.impl != "epcomm") continue;
    const std::string& w = row.key.workload;
    const std::string& t = row.key.timing;  // kernel rows against kernel rows, events against events
    const Row* nccl_dispatch = find_row(rows_, nccl, w, "dispatch", bf16, std::nullopt, t);
    const Row* nccl_cached = find_row(rows_, nccl, w, "dispatch_cached", bf16, std::nullopt, t);
    const Row* nccl_combine = find_row(rows_, nccl, w, "combine", bf16, std::nullopt, t);
    if (row.key.op == "dispatch_cached" && row.key.dtype == bf16) {
      const Row* combine = find_row(rows_, "epcomm", w, "combine", bf16, row.key.num_sms, t);
      if (!combine) continue;
      const double ours = row.time_us_median + combine->time_us_median;
      const std::string sms = concat(" @ ", sms_text(row.key.num_sms), " SMs, ", t);
      line(concat(w, ": dispatch_cached bf16 + combine", sms, " / nccl full"), ours, nccl_dispatch, nccl_combine);
      line(concat(w, ": dispatch_cached bf16 + combine", sms, " / nccl cached"), ours, nccl_cached, nccl_combine);
    }
    if (row.key.op == "ll_dispatch") {
      const Row* combine = find_row(rows_, "epcomm", w, "ll_combine", bf16, std::nullopt, t);
      if (!combine) continue;
      line(concat(w, ": ll_dispatch ", row.key.dtype.value_or("-"), " + ll_combine, ", t, " / nccl full"),
           row.time_us_median + combine->time_us_median, nccl_dispatch, nccl_combine);
    }
  }
}

std::string Report::json_row(const RunInfo& info, const Row& row) {
  const FigureKey& k = row.key;
  auto num = [](double v) { return json_number(v, 3); };
  return concat("{\"date\": ", json_string(info.date), ", \"machine\": ", json_string(info.machine),
                ", \"commit\": ", json_string(info.commit), ", \"impl\": ", json_string(k.impl),
                ", \"workload\": ", json_string(k.workload), ", \"op\": ", json_string(k.op),
                ", \"dtype\": ", json_optional(k.dtype, json_string), ", \"ranks\": ", k.ranks,
                ", \"num_sms\": ", json_optional(k.num_sms, [](int v) { return std::to_string(v); }),
                ", \"tokens\": ", k.tokens, ", \"hidden\": ", k.hidden, ", \"topk\": ", k.topk,
                ", \"experts\": ", k.experts, ", \"time_us_median\": ", num(row.time_us_median),
                ", \"time_us_min\": ", num(row.time_us_min), ", \"time_us_max\": ", num(row.time_us_max),
                ", \"gbps_median\": ", json_optional(row.gbps_median, num), ", \"timing\": ", json_string(k.timing),
                "}");
}

void Report::open_json(const std::string& path) {
  std::ofstream file(path, std::ios::trunc);
  if (!file)
    throw_error(ErrorCode::kInvalidArgument,
                concat("epcomm-bench: --json: cannot open ", path, ": ", std::strerror(errno)));
  json_path_ = path;
}

void Report::add(const Row& row) {
  rows_.push_back(row);
  if (json_path_.empty()) return;
  std::ofstream file(json_path_, std::ios::app);
  file << json_row(info_, row) << '\n';
  file.close();
  if (!file) throw_error(ErrorCode::kInternal, concat("epcomm-bench: --json: writing ", json_path_, " failed"));
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

std::string commit_id() { return env_text("EPCOMM_COMMIT").value_or(std::string(build_commit())); }

}  // namespace epcomm::bench
