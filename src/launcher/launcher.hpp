// Starting the ranks of one machine: N child processes, a bootstrap server for them, their output
// captured through pipes, their exits watched. Used by epcomm-run and by the test harness.
//
// Everything runs in the calling thread, in one poll loop (no threads, no signal handlers), so it
// can be used from a process that forks, such as a gtest binary.
//
// Failure policy: when a rank exits (with any code) or is killed, the bootstrap server at once fails
// every collective that waits for it and the job-status page tells the CPU backend's waits (the
// others get Error(kPeerFailure)). When the exit was non-zero or a kill, the others then have
// `failure_grace` to finish on their own before they are sent SIGTERM, and `kill_grace` more before
// SIGKILL. The overall `timeout` stops every rank the same way. Nothing is left running on return.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <csignal>
#include <deque>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace epcomm::launch {

enum class OutputStream { kStdout, kStderr };

struct LaunchOptions {
  int num_ranks = 1;
  std::chrono::milliseconds timeout{0};           // for the whole run; 0 = none
  std::chrono::milliseconds failure_grace{2000};  // after a failure, before the others get SIGTERM
  std::chrono::milliseconds kill_grace{3000};     // after SIGTERM, before SIGKILL
  size_t tail_lines = 50;                         // lines of output kept per rank for reports
  // Called for every line a rank prints (without its '\n'), as it arrives. Optional.
  std::function<void(int rank, OutputStream stream, std::string_view line)> on_line;
  // Checked every turn of the loop; when it becomes non-zero every rank is stopped (epcomm-run sets
  // it from its SIGINT/SIGTERM handler). Optional.
  const volatile std::sig_atomic_t* stop_requested = nullptr;
};

struct RankResult {
  int rank = -1;
  pid_t pid = -1;
  bool exited = false;  // normal exit with `exit_code`
  int exit_code = 0;
  bool signaled = false;  // killed by `signal`
  int signal = 0;
  bool stopped_by_launcher = false;  // it was sent SIGTERM/SIGKILL because of a failure or the timeout
  std::deque<std::string> tail;      // its last output lines, stdout and stderr in arrival order

  bool ok() const { return exited && exit_code == 0; }
  // "exited with code 3", "was killed by signal 11 (SIGSEGV)".
  std::string how() const;
};

struct LaunchResult {
  std::vector<RankResult> ranks;
  int first_failure = -1;       // the rank whose failure ended the run (the first one seen), or -1
  bool timed_out = false;       // the overall timeout stopped a run in which no rank had failed
  bool stop_requested = false;  // `stop_requested` stopped the run
  // What the bootstrap server was waiting for when the launcher began stopping ranks (after a
  // failure, the timeout or a stop request), e.g. "barrier #3: waiting for rank 2"; empty if nothing.
  std::string bootstrap_waiting;

  bool ok() const;
  std::vector<int> failed_ranks() const;
};

// Runs `rank_main(rank)` in `options.num_ranks` forked processes; the return value is the child's
// exit status, and an exception leaving `rank_main` is printed and gives status 1. Each child has
// EPCOMM_RANK, EPCOMM_WORLD_SIZE, EPCOMM_LOCAL_RANK, EPCOMM_LOCAL_WORLD_SIZE, EPCOMM_BOOTSTRAP
// (an abstract unix socket: "unix:@epcomm-<random>"), EPCOMM_BOOTSTRAP_SECRET (random per run;
// the server refuses a hello without it) and EPCOMM_JOB_STATUS_FD (the job-status page, see
// bootstrap/job_status.hpp: how each rank ended, for peers waiting in shared memory)
// set, stdin from /dev/null, stdout and stderr to pipes, and leaves with _exit() after flushing
// stdio (no atexit handlers, no static destructors of the parent's state). Returns once every
// child has ended. An ignored SIGCHLD is set to its default for the run (else the ranks could not be
// reaped) and restored after. Throws std::runtime_error when the run cannot be set up.
LaunchResult launch_functions(const LaunchOptions& options, const std::function<int(int rank)>& rank_main);

// Runs `argv` (argv[0] looked up in PATH) in `options.num_ranks` processes, as above.
LaunchResult launch_program(const LaunchOptions& options, const std::vector<std::string>& argv);

// "SIGSEGV" for 11; "signal 42" for one without a common name.
std::string signal_name(int signal);

}  // namespace epcomm::launch
