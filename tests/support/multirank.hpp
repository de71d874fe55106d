// The multi-rank test harness: run a test body on N ranks (forked processes) that can talk to
// each other through a Bootstrap, and turn each failed rank into one gtest failure in the parent.
//
//   TEST(Dispatch, RoutesEveryToken) {
//     epcomm::testing::run_ranks(4, [](epcomm::Bootstrap& group) {
//       ... EXPECT_EQ(...) as usual; throw to fail the rank ...
//     });
//   }
//
// The parent process only forks, serves the bootstrap and collects output: it never touches CUDA,
// so GPU tests may call cudaSetDevice(rank) in the body.
#pragma once

#include <chrono>
#include <functional>

#include "epcomm/bootstrap.hpp"
#include "launcher/launcher.hpp"

namespace epcomm::testing {

struct RunRanksOptions {
  std::chrono::seconds timeout{120};  // for the whole run; then every rank is killed and it fails
  bool print_output_on_success = false;
  // Timeout of the bootstrap handed to the body; 0: $EPCOMM_TIMEOUT_S, else 100 s.
  std::chrono::milliseconds bootstrap_timeout{0};
};

// Forks num_ranks processes; each calls body(bootstrap) with a Bootstrap connected to a server run
// by the calling process. A rank fails if body throws (the exception's what() is printed), if it
// records a gtest failure, or if it crashes. Each failed rank becomes one ADD_FAILURE() in the
// parent carrying that rank's output (a run that timed out also says what the ranks waited for).
// Children leave with _exit() after flushing stdout/stderr.
void run_ranks(int num_ranks, const std::function<void(Bootstrap&)>& body, const RunRanksOptions& options = {});

// The same run without judging it: for tests that expect a rank to fail. A rank's exit code is 0
// when body returned without a gtest failure, kBodyThrew when it threw, kGtestFailure when it
// recorded a failure.
constexpr int kBodyThrew = 3;
constexpr int kGtestFailure = 4;
launch::LaunchResult run_ranks_unchecked(int num_ranks, const std::function<void(Bootstrap&)>& body,
                                         const RunRanksOptions& options = {});

// The output kept for one rank, one line each, for failure messages.
std::string format_output(const launch::RankResult& rank);

}  // namespace epcomm::testing
