// The launcher library (launch_functions), the run_ranks harness built on it, and the epcomm-run
// tool: exit statuses, signals, output capture, stopping the others after a failure, timeouts.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bootstrap/job_monitor.hpp"
#include "epcomm/bootstrap.hpp"
#include "epcomm/epcomm.hpp"
#include "launcher/launcher.hpp"
#include "support/multirank.hpp"

namespace epcomm {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using launch::LaunchOptions;
using launch::OutputStream;
using testing::run_ranks;

int64_t ms_since(Clock::time_point start) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
}

bool contains(const std::string& text, const std::string& fragment) { return text.find(fragment) != std::string::npos; }

std::string joined(const launch::RankResult& r) {
  std::string text;
  for (const auto& line : r.tail) text += line + "\n";
  return text;
}

LaunchOptions options_for(int num_ranks) {
  LaunchOptions options;
  options.num_ranks = num_ranks;
  options.timeout = std::chrono::seconds(60);
  return options;
}

void sleep_ms(int ms) { std::this_thread::sleep_for(milliseconds(ms)); }

// ---- launch_functions ------------------------------------------------------------------------------

TEST(Launcher, EachRankSeesItsEnvironmentAndItsOutputIsCapturedPerStream) {
  LaunchOptions options = options_for(4);
  std::vector<std::string> seen;  // "rank stream line", from on_line
  options.on_line = [&](int rank, OutputStream stream, std::string_view line) {
    seen.push_back(std::to_string(rank) + (stream == OutputStream::kStdout ? " out " : " err ") + std::string(line));
  };
  const auto run = launch::launch_functions(options, [](int rank) {
    const std::string expect_rank = std::to_string(rank);
    const char* address = std::getenv("EPCOMM_BOOTSTRAP");
    const bool env_ok = std::getenv("EPCOMM_RANK") == expect_rank && std::getenv("EPCOMM_LOCAL_RANK") == expect_rank &&
                        std::string(std::getenv("EPCOMM_WORLD_SIZE")) == "4" &&
                        std::string(std::getenv("EPCOMM_LOCAL_WORLD_SIZE")) == "4" && address != nullptr &&
                        std::string(address).rfind("unix:", 0) == 0;
    std::printf("stdout of rank %d\n", rank);
    std::fprintf(stderr, "stderr of rank %d\n", rank);
    return env_ok ? 0 : 9;
  });
  ASSERT_EQ(run.ranks.size(), 4u);
  EXPECT_TRUE(run.ok());
  EXPECT_EQ(run.first_failure, -1);
  for (int r = 0; r < 4; ++r) {
    EXPECT_TRUE(run.ranks[r].ok()) << "rank " << r << " " << run.ranks[r].how();
    EXPECT_EQ(run.ranks[r].tail.size(), 2u) << joined(run.ranks[r]);
    EXPECT_TRUE(contains(joined(run.ranks[r]), "stdout of rank " + std::to_string(r)));
    EXPECT_TRUE(contains(joined(run.ranks[r]), "stderr of rank " + std::to_string(r)));
    EXPECT_NE(std::find(seen.begin(), seen.end(), std::to_string(r) + " out stdout of rank " + std::to_string(r)),
              seen.end());
    EXPECT_NE(std::find(seen.begin(), seen.end(), std::to_string(r) + " err stderr of rank " + std::to_string(r)),
              seen.end());
  }
  EXPECT_EQ(seen.size(), 8u);
}

TEST(Launcher, AFailedRankIsReportedAndTheOthersAreStopped) {
  LaunchOptions options = options_for(3);
  options.failure_grace = milliseconds(200);
  const auto start = Clock::now();
  const auto run = launch::launch_functions(options, [](int rank) {
    if (rank == 1) {
      std::printf("rank 1 gives up\n");
      return 7;
    }
    sleep_ms(30'000);
    return 0;
  });
  EXPECT_LT(ms_since(start), 5000) << "the others were not stopped";
  EXPECT_FALSE(run.ok());
  EXPECT_FALSE(run.timed_out);
  EXPECT_EQ(run.first_failure, 1);
  EXPECT_TRUE(run.ranks[1].exited);
  EXPECT_EQ(run.ranks[1].exit_code, 7);
  EXPECT_EQ(run.ranks[1].how(), "exited with code 7");
  EXPECT_FALSE(run.ranks[1].stopped_by_launcher);
  EXPECT_EQ(joined(run.ranks[1]), "rank 1 gives up\n");
  for (int r : {0, 2}) {
    EXPECT_TRUE(run.ranks[r].stopped_by_launcher) << r;
    EXPECT_TRUE(run.ranks[r].signaled && run.ranks[r].signal == SIGTERM) << run.ranks[r].how();
  }
  EXPECT_EQ(run.failed_ranks(), (std::vector<int>{0, 1, 2}));
}

TEST(Launcher, ATimeoutDuringTheFailureGraceStillReportsTheFailure) {
  LaunchOptions options = options_for(2);
  options.failure_grace = milliseconds(30'000);
  options.timeout = milliseconds(500);
  const auto start = Clock::now();
  const auto run = launch::launch_functions(options, [](int rank) {
    if (rank == 1) return 3;
    sleep_ms(30'000);
    return 0;
  });
  EXPECT_LT(ms_since(start), 5000);
  EXPECT_FALSE(run.timed_out) << "the failure, not the timeout, ended this run";
  EXPECT_EQ(run.first_failure, 1);
  EXPECT_TRUE(run.ranks[0].stopped_by_launcher);
}

TEST(Launcher, ARankIgnoringSigtermIsKilledAfterTheGracePeriod) {
  LaunchOptions options = options_for(2);
  options.timeout = milliseconds(300);
  options.kill_grace = milliseconds(300);
  const auto start = Clock::now();
  const auto run = launch::launch_functions(options, [](int rank) {
    if (rank == 0) std::signal(SIGTERM, SIG_IGN);
    sleep_ms(30'000);
    return 0;
  });
  EXPECT_LT(ms_since(start), 5000);
  EXPECT_TRUE(run.timed_out);
  EXPECT_TRUE(run.ranks[0].signaled && run.ranks[0].signal == SIGKILL) << run.ranks[0].how();
  EXPECT_TRUE(run.ranks[1].signaled && run.ranks[1].signal == SIGTERM) << run.ranks[1].how();
}

TEST(Launcher, TheTimeoutSaysWhatTheBootstrapWaitedFor) {
  LaunchOptions options = options_for(3);
  options.timeout = milliseconds(700);
  const auto run = launch::launch_functions(options, [](int rank) {
    auto group = bootstrap_from_env(std::chrono::seconds(60));
    if (rank == 2) sleep_ms(30'000);
    group->barrier();
    return 0;
  });
  EXPECT_TRUE(run.timed_out);
  EXPECT_FALSE(run.ok());
  EXPECT_EQ(run.bootstrap_waiting, "barrier #0: waiting for rank 2");
  for (const auto& r : run.ranks) EXPECT_TRUE(r.stopped_by_launcher && r.signaled) << r.rank << " " << r.how();
}

TEST(Launcher, SignalsAndExceptionsAreReportedByName) {
  const auto run = launch::launch_functions(options_for(2), [](int rank) -> int {
    if (rank == 0) std::raise(SIGUSR1);
    throw std::runtime_error("boom from rank 1");
  });
  EXPECT_TRUE(run.ranks[0].signaled);
  EXPECT_EQ(run.ranks[0].how(), "was killed by signal " + std::to_string(SIGUSR1) + " (SIGUSR1)");
  EXPECT_EQ(run.ranks[1].how(), "exited with code 1");
  EXPECT_TRUE(contains(joined(run.ranks[1]), "rank 1: uncaught exception: boom from rank 1")) << joined(run.ranks[1]);
  EXPECT_EQ(launch::signal_name(SIGSEGV), "SIGSEGV");
  EXPECT_EQ(launch::signal_name(77), "signal 77");
}

TEST(Launcher, AFloodOfOutputAndAnUnterminatedLastLineAreKept) {
  LaunchOptions options = options_for(2);
  size_t lines_seen = 0;
  options.on_line = [&](int, OutputStream, std::string_view) { ++lines_seen; };
  const auto run = launch::launch_functions(options, [](int rank) {
    for (int i = 0; i < 20000; ++i) std::printf("rank %d line %d\n", rank, i);
    std::fflush(stdout);
    std::fprintf(stderr, "no newline at the end");
    return 0;
  });
  EXPECT_EQ(lines_seen, 2u * 20001u);
  for (const auto& r : run.ranks) {
    ASSERT_EQ(r.tail.size(), 50u);
    EXPECT_EQ(r.tail.back(), "no newline at the end");
    EXPECT_EQ(r.tail[r.tail.size() - 2], "rank " + std::to_string(r.rank) + " line 19999");
  }
}

// A launcher whose process ignores SIGCHLD (a disposition that survives exec, so epcomm-run inherits
// it from whoever started it) must still learn how its ranks ended: with SIGCHLD ignored the kernel
// reaps children itself and waitpid() never reports them, so the run would never end. The launch
// runs in a helper process, bounded here, so that a hang fails the test instead of stalling it.
TEST(Launcher, RanksAreReapedEvenWhenSigchldIsIgnored) {
  const pid_t helper = ::fork();
  ASSERT_GE(helper, 0);
  if (helper == 0) {
    std::signal(SIGCHLD, SIG_IGN);
    LaunchOptions options = options_for(2);
    options.timeout = milliseconds(3000);
    const auto run = launch::launch_functions(options, [](int rank) { return rank == 1 ? 3 : 0; });
    const bool right = !run.timed_out && run.ranks[0].ok() && run.ranks[1].exited && run.ranks[1].exit_code == 3;
    const bool restored = std::signal(SIGCHLD, SIG_DFL) == SIG_IGN;  // the caller's choice is given back
    ::_exit(right ? (restored ? 0 : 2) : 1);
  }
  int status = 0;
  const auto start = Clock::now();
  while (::waitpid(helper, &status, WNOHANG) == 0) {
    if (ms_since(start) > 10000) {
      ::kill(helper, SIGKILL);
      ::waitpid(helper, &status, 0);
      break;
    }
    sleep_ms(20);
  }
  ASSERT_TRUE(WIFEXITED(status)) << "the launch did not end: its ranks were never reaped";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: wrong results; 2: SIGCHLD's disposition was not restored";
}

TEST(Launcher, ZeroRanksIsRefused) {
  LaunchOptions options = options_for(0);
  EXPECT_THROW(launch::launch_functions(options, [](int) { return 0; }), std::invalid_argument);
}

// ---- a rank that leaves while its peers wait in shared memory (issue 11, item 6) -------------------

constexpr int kHidden = 64, kTokens = 16, kTopK = 2;

Buffer make_cpu_buffer(Bootstrap& group, milliseconds timeout) {
  BufferOptions options;
  options.backend = BackendKind::kCpu;
  options.num_nvl_bytes = default_dispatch_config(group.size()).nvl_buffer_size_hint(kHidden * 2, group.size());
  options.timeout = timeout;
  return Buffer(group, options);
}

// One dispatch of fresh random bf16 rows (small integers) routed to random experts.
void dispatch_once(Buffer& buffer, Bootstrap& group, uint64_t seed) {
  std::mt19937_64 rng(seed + group.rank());
  const int num_experts = 4 * group.size();
  std::vector<uint16_t> x(kTokens * kHidden);
  for (auto& v : x) v = static_cast<uint16_t>(0x3f80 + rng() % 64);
  std::vector<int64_t> topk_idx(kTokens * kTopK);
  std::vector<float> weights(kTokens * kTopK, 0.5f);
  for (int t = 0; t < kTokens; ++t) {
    topk_idx[t * kTopK] = int64_t(rng() % num_experts);
    topk_idx[t * kTopK + 1] = (topk_idx[t * kTopK] + 1 + int64_t(rng() % (num_experts - 1))) % num_experts;
  }
  const Device cpu = Device::cpu();
  DispatchInputs in;
  in.x = TensorView::contiguous(x.data(), DType::kBFloat16, {kTokens, kHidden}, cpu);
  in.topk_idx = TensorView::contiguous(topk_idx.data(), DType::kInt64, {kTokens, kTopK}, cpu);
  in.topk_weights = TensorView::contiguous(weights.data(), DType::kFloat32, {kTokens, kTopK}, cpu);
  in.num_experts = num_experts;
  buffer.dispatch(in);
}

// Rank 3 leaves (exit code 0, no destroy()) where the others enter `step`: they must get
// kPeerFailure naming it within a few seconds, although their timeout is a minute.
void expect_departure_is_heard(const char* step, const std::function<void(Buffer&, Bootstrap&)>& enter) {
  const uint64_t seed = std::random_device{}();
  const auto run = testing::run_ranks_unchecked(4, [&](Bootstrap& group) {
    Buffer buffer = make_cpu_buffer(group, std::chrono::seconds(60));
    dispatch_once(buffer, group, seed);  // a healthy call first
    if (group.rank() == 3) return;       // leaves: its Buffer is released, not destroyed
    const auto start = Clock::now();
    try {
      enter(buffer, group);
      ADD_FAILURE() << step << " completed without rank 3";
    } catch (const Error& e) {
      std::printf("rank %d after %lld ms: %s\n", group.rank(), static_cast<long long>(ms_since(start)), e.what());
      EXPECT_EQ(e.code(), ErrorCode::kPeerFailure) << e.what();
      EXPECT_TRUE(contains(e.what(), "rank 3 exited with code 0")) << e.what();
    }
    EXPECT_LT(ms_since(start), 5000) << step << ": the departure was heard late (the timeout is 60 s)";
  });
  for (const auto& r : run.ranks)
    EXPECT_TRUE(r.ok()) << step << ": rank " << r.rank << " " << r.how() << "\n" << testing::format_output(r);
}

TEST(JobMonitor, ARankThatExitsZeroWithoutDestroyFailsThePeersInDestroyAtOnce) {
  expect_departure_is_heard("destroy", [](Buffer& buffer, Bootstrap&) { buffer.destroy(); });
}

TEST(JobMonitor, ARankThatExitsZeroInsteadOfDispatchingFailsThePeersDispatchAtOnce) {
  const uint64_t seed = std::random_device{}();
  expect_departure_is_heard("dispatch", [&](Buffer& buffer, Bootstrap& group) { dispatch_once(buffer, group, seed); });
}

// The normal end: every rank destroys, and each leaves the moment its destroy() returns, while
// slower peers may still be looking at its counter. No peer failure may be reported.
TEST(JobMonitor, RanksLeavingRightAfterDestroyAreNotAFailure) {
  const uint64_t seed = std::random_device{}();
  run_ranks(4, [&](Bootstrap& group) {
    for (int round = 0; round < 5; ++round) {
      Buffer buffer = make_cpu_buffer(group, std::chrono::seconds(60));
      dispatch_once(buffer, group, seed + round);
      if (group.rank() != 0) std::this_thread::sleep_for(milliseconds(group.rank() * 7 * round));
      buffer.destroy();
    }
  });
}

TEST(JobMonitor, TheLauncherUsesNothingWithANameThatCouldOutliveTheJob) {
  // The bootstrap socket is abstract and the job-status page a memfd: nothing in /tmp or /dev/shm.
  const auto run = launch::launch_functions(options_for(2), [](int) {
    const std::string address = std::getenv("EPCOMM_BOOTSTRAP");
    return address.rfind("unix:@epcomm-", 0) == 0 && std::getenv("EPCOMM_JOB_STATUS_FD") != nullptr ? 0 : 70;
  });
  EXPECT_TRUE(run.ok());
}

// What JobMonitor::current() does in a fresh process (it opens once per process) whose environment
// has `fd` and `rank` (nullptr: unset): "none", "monitor", or the message of the Error it raised,
// twice in a row (a malformed value must not be remembered as "no monitor").
std::string job_monitor_in_child(const char* fd, const char* rank) {
  int pipe_fds[2];
  if (::pipe(pipe_fds) != 0) return "pipe failed";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(pipe_fds[0]);
    fd ? ::setenv("EPCOMM_JOB_STATUS_FD", fd, 1) : ::unsetenv("EPCOMM_JOB_STATUS_FD");
    rank ? ::setenv("EPCOMM_RANK", rank, 1) : ::unsetenv("EPCOMM_RANK");
    std::string seen;
    for (int call = 0; call < 2; ++call) {
      try {
        seen += JobMonitor::current() ? "monitor;" : "none;";
      } catch (const Error& e) {
        seen += std::string(e.code() == ErrorCode::kInvalidArgument ? "" : "wrong code: ") + e.what() + ";";
      }
    }
    const ssize_t written = ::write(pipe_fds[1], seen.data(), seen.size());
    ::_exit(written == static_cast<ssize_t>(seen.size()) ? 0 : 1);
  }
  ::close(pipe_fds[1]);
  std::string seen;
  char chunk[512];
  for (ssize_t n; (n = ::read(pipe_fds[0], chunk, sizeof chunk)) > 0;) seen.append(chunk, static_cast<size_t>(n));
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? seen : "the child failed: " + seen;
}

TEST(JobMonitor, WithoutTheVariablesThereIsNoMonitor) {
  EXPECT_EQ(job_monitor_in_child(nullptr, nullptr), "none;none;");
  // MPI or torchrun may set a rank variable of their own: without the descriptor it is not read.
  EXPECT_EQ(job_monitor_in_child(nullptr, "not a rank"), "none;none;");
  EXPECT_EQ(job_monitor_in_child("3", nullptr), "none;none;");
  // A descriptor that is not a job-status page (one a child did not inherit) is no monitor either.
  EXPECT_EQ(job_monitor_in_child("0", "0"), "none;none;");
}

TEST(JobMonitor, AMalformedVariableIsAnErrorNamingIt) {
  for (const char* fd : {"3x", " 3", "-1", "99999999999"}) {
    const std::string seen = job_monitor_in_child(fd, "0");
    EXPECT_TRUE(contains(seen, "EPCOMM_JOB_STATUS_FD: expected an integer")) << fd << ": " << seen;
    EXPECT_EQ(std::count(seen.begin(), seen.end(), ';'), 2) << seen;
    EXPECT_FALSE(contains(seen, "none") || contains(seen, "wrong code")) << fd << ": " << seen;
  }
  for (const char* rank : {"1.5", "-2", "rank0"}) {
    const std::string seen = job_monitor_in_child("3", rank);
    EXPECT_TRUE(contains(seen, "EPCOMM_RANK: expected an integer")) << rank << ": " << seen;
    EXPECT_FALSE(contains(seen, "none") || contains(seen, "wrong code")) << rank << ": " << seen;
  }
}

// ---- run_ranks: each failed rank becomes one failure in the parent ----------------------------------

TEST(RunRanks, AGtestFailureInARankFailsTheTestWithItsOutput) {
  EXPECT_NONFATAL_FAILURE(run_ranks(3,
                                    [](Bootstrap& group) {
                                      std::printf("rank %d says hi\n", group.rank());
                                      EXPECT_NE(group.rank(), 1) << "marker of rank 1";
                                    }),
                          "rank 1 exited with code 4 (its body recorded gtest failures)");
  EXPECT_NONFATAL_FAILURE(run_ranks(3, [](Bootstrap& group) { EXPECT_NE(group.rank(), 2) << "marker of rank 2"; }),
                          "marker of rank 2");
}

TEST(RunRanks, AnExceptionOrACrashInARankFailsTheTest) {
  EXPECT_NONFATAL_FAILURE(run_ranks(2,
                                    [](Bootstrap& group) {
                                      if (group.rank() == 0) throw std::runtime_error("thrown by rank 0");
                                    }),
                          "the body threw: thrown by rank 0");
  EXPECT_NONFATAL_FAILURE(run_ranks(2,
                                    [](Bootstrap& group) {
                                      if (group.rank() == 1) std::raise(SIGKILL);
                                    }),
                          "rank 1 was killed by signal 9 (SIGKILL)");
}

TEST(RunRanks, AHangIsStoppedByTheTimeout) {
  testing::RunRanksOptions options;
  options.timeout = std::chrono::seconds(1);
  const auto start = Clock::now();
  EXPECT_NONFATAL_FAILURE(run_ranks(
                              1, [](Bootstrap&) { sleep_ms(30'000); }, options),
                          "after run_ranks timed out (1 s)");
  EXPECT_LT(ms_since(start), 6000);
}

TEST(RunRanks, AFailureTheParentRecordedEarlierDoesNotFailTheRanks) {
  EXPECT_NONFATAL_FAILURE(
      {
        ADD_FAILURE() << "recorded by the parent";
        run_ranks(2, [](Bootstrap& group) { group.barrier(); });
      },
      "recorded by the parent");  // exactly one failure: the ranks added none
}

// ---- epcomm-run --------------------------------------------------------------------------------------

struct ToolRun {
  int status = -1;  // exit status, or 128 + signal
  std::string out, err;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Runs epcomm-run with `args` (a shell word list), capturing stdout and stderr.
ToolRun run_tool(const std::string& args) {
  char dir_template[] = "/tmp/epcomm-run-test-XXXXXX";
  const std::string dir = ::mkdtemp(dir_template);
  const std::string command =
      std::string(EPCOMM_RUN_PATH) + " " + args + " >" + dir + "/out 2>" + dir + "/err </dev/null";
  const int raw = std::system(command.c_str());
  ToolRun result;
  result.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  result.out = read_file(dir + "/out");
  result.err = read_file(dir + "/err");
  std::remove((dir + "/out").c_str());
  std::remove((dir + "/err").c_str());
  ::rmdir(dir.c_str());
  return result;
}

const std::string kProbe = EPCOMM_RUN_PROBE_PATH;

TEST(EpcommRun, AllRanksPassingExitsZeroAndPrefixesEveryLine) {
  const ToolRun run = run_tool("-n 3 " + kProbe + " ok");
  EXPECT_EQ(run.status, 0) << run.out << run.err;
  for (int r = 0; r < 3; ++r) {
    const std::string k = std::to_string(r);
    EXPECT_TRUE(contains(run.out, "[rank " + k + "] hello from rank " + k + " of 3\n")) << run.out;
    EXPECT_TRUE(contains(run.err, "[rank " + k + "] rank " + k + " done\n")) << run.err;
  }
  EXPECT_FALSE(contains(run.err, "epcomm-run:")) << run.err;
}

TEST(EpcommRun, EnvironmentOfEachRank) {
  const ToolRun run = run_tool("-n 2 " + kProbe + " env");
  EXPECT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(contains(run.out, "[rank 1] EPCOMM_RANK=1\n")) << run.out;
  EXPECT_TRUE(contains(run.out, "[rank 1] EPCOMM_LOCAL_RANK=1\n")) << run.out;
  EXPECT_TRUE(contains(run.out, "[rank 0] EPCOMM_WORLD_SIZE=2\n")) << run.out;
  EXPECT_TRUE(contains(run.out, "[rank 0] EPCOMM_LOCAL_WORLD_SIZE=2\n")) << run.out;
}

TEST(EpcommRun, AFailingRankIsNamedWithItsExitCodeAndLastLines) {
  const ToolRun run = run_tool("-n 3 " + kProbe + " exit 1 5");
  EXPECT_EQ(run.status, 5) << run.out << run.err;
  EXPECT_TRUE(contains(run.err, "epcomm-run: rank 1 failed: it exited with code 5\n")) << run.err;
  EXPECT_TRUE(contains(run.err, "last 50 lines of rank 1's output")) << run.err;
  EXPECT_TRUE(contains(run.err, "  [rank 1] line 59 of the failing rank\n")) << run.err;
  EXPECT_TRUE(contains(run.err, "  [rank 1] about to exit with 5\n")) << run.err;
  EXPECT_FALSE(contains(run.err, "  [rank 1] line 5 of the failing rank\n")) << "more than 50 lines: " << run.err;
  // The others were told (kPeerFailure naming rank 1) and exited 0 on their own.
  EXPECT_TRUE(
      contains(run.out, "[rank 0] rank 0 saw: epcomm: peer failure: bootstrap barrier #1 (rank 0 of 3): rank 1"))
      << run.out;
  EXPECT_FALSE(contains(run.err, "epcomm-run: rank 0")) << run.err;
}

TEST(EpcommRun, ACrashIsReportedWithTheSignalName) {
  const ToolRun run = run_tool("--quiet -n 2 " + kProbe + " crash 0");
  EXPECT_EQ(run.status, 128 + SIGABRT) << run.err;
  EXPECT_TRUE(contains(run.err, "epcomm-run: rank 0 failed: it was killed by signal 6 (SIGABRT)")) << run.err;
  EXPECT_TRUE(contains(run.err, "  [rank 0] about to abort\n")) << run.err;
  EXPECT_EQ(run.out, "") << "--quiet printed the ranks' output";
}

TEST(EpcommRun, QuietSuccessPrintsNothing) {
  const ToolRun run = run_tool("--quiet -n 2 " + kProbe + " ok");
  EXPECT_EQ(run.status, 0) << run.err;
  EXPECT_EQ(run.out, "");
  EXPECT_EQ(run.err, "");
}

TEST(EpcommRun, TheTimeoutStopsAHangingRun) {
  const auto start = Clock::now();
  const ToolRun run = run_tool("-n 2 --timeout 1 " + kProbe + " hang 1");
  EXPECT_LT(ms_since(start), 8000);
  EXPECT_EQ(run.status, 124) << run.err;
  EXPECT_TRUE(contains(run.err, "epcomm-run: timed out after 1 s")) << run.err;
  EXPECT_TRUE(contains(run.err, "epcomm-run: the bootstrap was at barrier #1: waiting for rank 1")) << run.err;
  EXPECT_TRUE(contains(run.err, "  [rank 1] hanging")) << run.err;
}

// A timeout under a millisecond is still a limit (it used to round down to 0 ms, which means none).
// The rank is bounded by timeout(1) so that, were the limit lost, the test ends anyway.
TEST(EpcommRun, ASubMillisecondTimeoutIsStillALimit) {
  const auto start = Clock::now();
  const ToolRun run = run_tool("-n 1 --timeout 0.0001 timeout 10 " + kProbe + " hang 0");
  EXPECT_LT(ms_since(start), 8000);
  EXPECT_EQ(run.status, 124) << run.err;
  EXPECT_TRUE(contains(run.err, "epcomm-run: timed out after 0.0001 s")) << run.err;
}

TEST(EpcommRun, ARankLeavingWithoutDestroyIsAPeerFailureForTheOthersAtOnce) {
  const auto start = Clock::now();
  const ToolRun run = run_tool("-n 3 " + kProbe + " leave 2");
  EXPECT_EQ(run.status, 0) << run.out << run.err;
  EXPECT_LT(ms_since(start), 10000);
  for (int r : {0, 1})
    EXPECT_TRUE(contains(run.out, "[rank " + std::to_string(r) + "] rank " + std::to_string(r) + " saw after"))
        << run.out;
  EXPECT_TRUE(contains(run.out, "destroy: rank 2 exited with code 0 before it got here")) << run.out;
}

TEST(EpcommRun, UsageErrorsAndHelp) {
  const ToolRun help = run_tool("--help");
  EXPECT_EQ(help.status, 0);
  EXPECT_TRUE(contains(help.out, "usage: epcomm-run -n N")) << help.out;
  EXPECT_TRUE(contains(help.out, "Exit status")) << help.out;
  const ToolRun no_n = run_tool(kProbe);
  EXPECT_EQ(no_n.status, 2);
  EXPECT_TRUE(contains(no_n.err, "the number of ranks is required")) << no_n.err;
  const ToolRun bad_n = run_tool("-n 0 " + kProbe);
  EXPECT_EQ(bad_n.status, 2);
  const ToolRun missing = run_tool("-n 2 /nonexistent/program");
  EXPECT_EQ(missing.status, 127) << missing.err;
  EXPECT_TRUE(contains(missing.err, "cannot run '/nonexistent/program'")) << missing.err;
}

}  // namespace
}  // namespace epcomm
