#include "support/multirank.hpp"

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <sstream>

#include "bootstrap/wire.hpp"
#include "core/check.hpp"

namespace epcomm::testing {
namespace {

constexpr size_t kOutputLines = 200;  // per rank, in failure messages

// In the child, every gtest failure of the body goes through these reporters: they print the
// failure at once (so it lands in the rank's output next to what the body printed) and count it.
// Counting ourselves rather than reading the test's recorded result means that failures the parent
// had recorded before forking, or an EXPECT_NONFATAL_FAILURE around run_ranks in the parent (whose
// reporter the child inherits), change nothing. One reporter takes the body's own thread (gtest
// prefers a per-thread reporter, which the parent may have set), the other any thread it starts.
class CountingReporter : public ::testing::ScopedFakeTestPartResultReporter {
 public:
  explicit CountingReporter(InterceptMode mode) : ScopedFakeTestPartResultReporter(mode, &results_) {}
  void ReportTestPartResult(const ::testing::TestPartResult& result) override {
    if (result.failed()) {
      std::ostringstream text;
      text << result;
      std::printf("%s\n", text.str().c_str());
      std::fflush(stdout);
    }
    ScopedFakeTestPartResultReporter::ReportTestPartResult(result);
  }
  int failures() const {
    int n = 0;
    for (int i = 0; i < results_.size(); ++i) n += results_.GetTestPartResult(i).failed() ? 1 : 0;
    return n;
  }

 private:
  ::testing::TestPartResultArray results_;
};

// Runs in the child. Reports what went wrong on stderr so it lands in the rank's output.
int run_body(int rank, const std::function<void(Bootstrap&)>& body, const RunRanksOptions& options) {
  CountingReporter other_threads(CountingReporter::INTERCEPT_ALL_THREADS);
  CountingReporter this_thread(CountingReporter::INTERCEPT_ONLY_CURRENT_THREAD);
  try {
    std::unique_ptr<Bootstrap> bootstrap = bootstrap_from_env(options.bootstrap_timeout);
    body(*bootstrap);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[run_ranks] rank %d: the body threw: %s\n", rank, e.what());
    return kBodyThrew;
  } catch (...) {
    std::fprintf(stderr, "[run_ranks] rank %d: the body threw an exception of unknown type\n", rank);
    return kBodyThrew;
  }
  const int failures = this_thread.failures() + other_threads.failures();
  if (failures > 0) {
    std::fprintf(stderr, "[run_ranks] rank %d: the body recorded %d gtest failure(s) (above)\n", rank, failures);
    return kGtestFailure;
  }
  return 0;
}

std::string why_failed(const launch::RankResult& r, const launch::LaunchResult& run, const RunRanksOptions& options) {
  std::string why = concat("rank ", r.rank, " ", r.how());
  if (r.exited && r.exit_code == kBodyThrew) why += " (its body threw)";
  if (r.exited && r.exit_code == kGtestFailure) why += " (its body recorded gtest failures)";
  if (r.stopped_by_launcher) {
    if (run.timed_out)
      why += concat(" after run_ranks timed out (", options.timeout.count(), " s)");
    else if (run.first_failure >= 0)
      why += concat(" after the harness stopped it because rank ", run.first_failure, " failed");
  }
  if (!run.bootstrap_waiting.empty()) why += concat("; the bootstrap was at ", run.bootstrap_waiting);
  return why;
}

}  // namespace

std::string format_output(const launch::RankResult& rank) {
  std::ostringstream out;
  out << "---- output of rank " << rank.rank << " (last " << rank.tail.size() << " lines) ----\n";
  for (const std::string& line : rank.tail) out << line << '\n';
  out << "---- end of rank " << rank.rank << " ----";
  return out.str();
}

launch::LaunchResult run_ranks_unchecked(int num_ranks, const std::function<void(Bootstrap&)>& body,
                                         const RunRanksOptions& options) {
  launch::LaunchOptions launch_options;
  launch_options.num_ranks = num_ranks;
  launch_options.timeout = options.timeout;
  launch_options.tail_lines = kOutputLines;
  return launch::launch_functions(launch_options, [&](int rank) { return run_body(rank, body, options); });
}

void run_ranks(int num_ranks, const std::function<void(Bootstrap&)>& body, const RunRanksOptions& options) {
  const launch::LaunchResult run = run_ranks_unchecked(num_ranks, body, options);
  for (const launch::RankResult& r : run.ranks) {
    if (!r.ok())
      ADD_FAILURE() << why_failed(r, run, options) << "\n" << format_output(r);
    else if (options.print_output_on_success)
      std::printf("%s\n", format_output(r).c_str());
  }
  if (run.timed_out && run.failed_ranks().empty())  // every rank ended just as the timeout hit
    ADD_FAILURE() << "run_ranks timed out after " << options.timeout.count() << " s";
  std::fflush(stdout);
}

}  // namespace epcomm::testing
