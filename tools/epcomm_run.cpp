// epcomm-run: starts N ranks of a program on this machine, connected through the epcomm bootstrap.
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "launcher/launcher.hpp"

namespace {

constexpr const char* kUsage = R"(usage: epcomm-run -n N [--timeout SECONDS] [--quiet] [--] program [args...]

Starts N processes ("ranks") of `program` on this machine and serves the bootstrap they use to find
each other (epcomm::bootstrap_from_env()); for several hosts use torchrun, srun or mpirun with
epcomm::tcp_bootstrap_from_env() or epcomm::mpi_bootstrap(). Each rank gets these environment variables:
  EPCOMM_RANK              its rank, 0 .. N-1
  EPCOMM_WORLD_SIZE        N
  EPCOMM_LOCAL_RANK        its rank on this machine (equal to EPCOMM_RANK)
  EPCOMM_LOCAL_WORLD_SIZE  N
  EPCOMM_BOOTSTRAP         the bootstrap server's address (unix:@<abstract socket name>)
  EPCOMM_BOOTSTRAP_SECRET  a random secret of this run; the server refuses ranks without it
  EPCOMM_JOB_STATUS_FD     a descriptor of the job-status page: how each rank ended, so that a
                           peer waiting for a rank that exited (even with code 0) hears it at once

Options:
  -n, --nproc N        number of ranks to start (required, >= 1)
  --timeout SECONDS    stop every rank and fail when the run is not over after SECONDS (fractions
                       allowed; default: no limit)
  --quiet              do not stream the ranks' output; a failure report is still printed
  -h, --help           print this help

Every line a rank prints is shown as "[rank K] line", stdout lines on stdout and stderr lines on
stderr. When a rank exits (with any code, before the others are done with it) or is killed, the
bootstrap and the CPU backend fail every wait for it (the other ranks get
epcomm::Error(kPeerFailure)). When it exited with a non-zero code or was killed, ranks still running
2 s later are sent SIGTERM, then SIGKILL 3 s after that. epcomm-run then reports which rank failed,
how, and its last 50 lines of output.

Exit status: 0 when every rank exited with 0; otherwise the exit code of the rank that failed first
(128 + the signal number when it was killed by a signal), 124 when the timeout stopped the run, 130
when epcomm-run was interrupted (SIGINT/SIGTERM), 2 for a usage error.
)";

constexpr size_t kTailLines = 50;

volatile std::sig_atomic_t g_stop_requested = 0;
void on_stop_signal(int) { g_stop_requested = 1; }

struct Arguments {
  int num_ranks = 0;
  double timeout_s = 0;
  bool quiet = false;
  std::vector<std::string> program;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "epcomm-run: %s\n(run `epcomm-run --help` for usage)\n", message.c_str());
  std::exit(2);
}

bool parse_int(const char* text, int& out) {
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < 1 || v > 1 << 20) return false;
  out = static_cast<int>(v);
  return true;
}

bool parse_seconds(const char* text, double& out) {
  char* end = nullptr;
  const double v = std::strtod(text, &end);
  if (end == text || *end != '\0' || !(v > 0) || v > 1e9) return false;
  out = v;
  return true;
}

Arguments parse_arguments(int argc, char** argv) {
  Arguments args;
  int i = 1;
  auto value = [&](const std::string& option) -> const char* {
    if (i + 1 >= argc) usage_error(option + " needs a value");
    return argv[++i];
  };
  for (; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") {
      ++i;
      break;
    }
    if (a.empty() || a[0] != '-') break;  // the program
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "-n" || a == "--nproc") {
      const char* v = value(a);
      if (!parse_int(v, args.num_ranks)) usage_error(a + ": expected a number of ranks >= 1, got '" + v + "'");
    } else if (a.rfind("--nproc=", 0) == 0 || (a.rfind("-n", 0) == 0 && a.size() > 2 && a[1] == 'n')) {
      const char* v = argv[i] + (a[1] == 'n' ? 2 : 8);
      if (!parse_int(v, args.num_ranks))
        usage_error("-n: expected a number of ranks >= 1, got '" + std::string(v) + "'");
    } else if (a == "--timeout" || a.rfind("--timeout=", 0) == 0) {
      const char* v = a == "--timeout" ? value(a) : argv[i] + 10;
      if (!parse_seconds(v, args.timeout_s))
        usage_error("--timeout: expected a number of seconds > 0, got '" + std::string(v) + "'");
    } else if (a == "--quiet" || a == "-q") {
      args.quiet = true;
    } else {
      usage_error("unknown option '" + a + "'");
    }
  }
  for (; i < argc; ++i) args.program.push_back(argv[i]);
  if (args.num_ranks < 1) usage_error("the number of ranks is required: -n N");
  if (args.program.empty()) usage_error("no program given");
  return args;
}

void print_tail(const epcomm::launch::RankResult& r) {
  if (r.tail.empty()) {
    std::fprintf(stderr, "epcomm-run: rank %d printed nothing\n", r.rank);
    return;
  }
  std::fprintf(stderr, "epcomm-run: last %zu lines of rank %d's output:\n", r.tail.size(), r.rank);
  for (const std::string& line : r.tail) std::fprintf(stderr, "  [rank %d] %s\n", r.rank, line.c_str());
}

// Prints what went wrong; returns the exit status.
int report_failure(const epcomm::launch::LaunchResult& run, const Arguments& args) {
  if (run.timed_out)
    std::fprintf(stderr, "epcomm-run: timed out after %g s\n", args.timeout_s);
  else if (run.stop_requested)
    std::fprintf(stderr, "epcomm-run: interrupted\n");
  if (!run.bootstrap_waiting.empty())
    std::fprintf(stderr, "epcomm-run: the bootstrap was at %s\n", run.bootstrap_waiting.c_str());
  if (run.first_failure >= 0) {
    const auto& first = run.ranks[run.first_failure];
    std::fprintf(stderr, "epcomm-run: rank %d failed: it %s\n", first.rank, first.how().c_str());
    print_tail(first);
  }
  for (const auto& r : run.ranks) {
    if (r.ok() || r.rank == run.first_failure) continue;
    if (r.stopped_by_launcher)
      std::fprintf(stderr, "epcomm-run: rank %d was stopped by epcomm-run: it %s\n", r.rank, r.how().c_str());
    else
      std::fprintf(stderr, "epcomm-run: rank %d %s\n", r.rank, r.how().c_str());
    if (run.first_failure < 0) print_tail(r);  // a timeout: show where each rank was
  }
  if (run.stop_requested) return 130;
  if (run.timed_out) return 124;
  if (run.first_failure >= 0) {
    const auto& first = run.ranks[run.first_failure];
    return first.signaled ? 128 + first.signal : first.exit_code;
  }
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Arguments args = parse_arguments(argc, argv);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);

  epcomm::launch::LaunchOptions options;
  options.num_ranks = args.num_ranks;
  // Rounded up: a timeout under a millisecond must not become 0, which means no limit.
  options.timeout = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(args.timeout_s * 1000.0)));
  options.tail_lines = kTailLines;
  options.stop_requested = &g_stop_requested;
  if (!args.quiet) {
    options.on_line = [](int rank, epcomm::launch::OutputStream stream, std::string_view line) {
      std::FILE* to = stream == epcomm::launch::OutputStream::kStdout ? stdout : stderr;
      std::fprintf(to, "[rank %d] %.*s\n", rank, static_cast<int>(line.size()), line.data());
      std::fflush(to);
    };
  }
  try {
    const epcomm::launch::LaunchResult run = epcomm::launch::launch_program(options, args.program);
    if (run.ok()) return 0;
    std::fflush(stdout);
    return report_failure(run, args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "epcomm-run: %s\n", e.what());
    return 1;
  }
}
