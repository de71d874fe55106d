#include "launcher/launcher.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <optional>
#include <stdexcept>

#include "bootstrap/job_status.hpp"
#include "core/check.hpp"  // concat (header-only use)
#include "launcher/bootstrap_server.hpp"

namespace epcomm::launch {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kPollIntervalMs = 20;                     // how often exits and deadlines are checked
constexpr size_t kMaxLineBytes = 64 * 1024;             // a longer line is cut into pieces
constexpr std::chrono::milliseconds kDrainGrace{1000};  // after the last exit, for output still in flight

[[noreturn]] void throw_system(const std::string& what) {
  throw std::runtime_error(concat("epcomm launcher: ", what, ": ", std::strerror(errno)));
}

// Random bytes from the kernel, as hex.
std::string random_hex(size_t bytes) {
  std::vector<unsigned char> raw(bytes);
  size_t got = 0;
  while (got < bytes) {
    const ssize_t n = ::getrandom(raw.data() + got, bytes - got, 0);
    if (n < 0 && errno != EINTR) throw_system("getrandom");
    if (n > 0) got += static_cast<size_t>(n);
  }
  static const char kDigits[] = "0123456789abcdef";
  std::string text;
  for (unsigned char b : raw) text += {kDigits[b >> 4], kDigits[b & 15]};
  return text;
}

// The job-status page (bootstrap/job_status.hpp) in a memfd: it has no name, so nothing of it
// outlives the job, whatever happens to the launcher.
class JobStatusPage {
 public:
  explicit JobStatusPage(int world_size) : bytes_(job_status::page_bytes(world_size)) {
    fd_ = ::memfd_create("epcomm-job-status", MFD_CLOEXEC);
    if (fd_ < 0) throw_system("memfd_create");
    if (::ftruncate(fd_, static_cast<off_t>(bytes_)) != 0) {
      ::close(fd_);
      throw_system("ftruncate (job status)");
    }
    void* page = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (page == MAP_FAILED) {
      ::close(fd_);
      throw_system("mmap (job status)");
    }
    page_ = page;
    uint64_t token = 0;
    while (token == 0) token = std::stoull(random_hex(8), nullptr, 16);  // 0 means "no job"
    *job_status::header(page_) = {job_status::kMagic, static_cast<uint32_t>(world_size), token};
  }
  ~JobStatusPage() {
    ::munmap(page_, bytes_);
    ::close(fd_);
  }
  JobStatusPage(const JobStatusPage&) = delete;
  JobStatusPage& operator=(const JobStatusPage&) = delete;

  // In a child: keep the descriptor open across exec.
  void inherit() const { ::fcntl(fd_, F_SETFD, 0); }
  int fd() const { return fd_; }

  void mark_ended(int rank, const std::string& how) {
    job_status::Slot* slot = job_status::slot(page_, rank);
    std::snprintf(slot->how, sizeof(slot->how), "%s", how.c_str());
    slot->ended.store(1, std::memory_order_release);
  }

 private:
  size_t bytes_;
  int fd_ = -1;
  void* page_ = nullptr;
};

// While a run is in progress SIGCHLD must not be ignored (nor carry SA_NOCLDWAIT): the kernel would
// then reap the ranks itself and waitpid() could never report how they ended, so the run would never
// end. An ignored SIGCHLD is inherited across exec, so epcomm-run can be started that way. The
// caller's disposition is put back when the run is over.
class ChildrenReportable {
 public:
  ChildrenReportable() {
    if (::sigaction(SIGCHLD, nullptr, &saved_) != 0) return;
    if (saved_.sa_handler != SIG_IGN && (saved_.sa_flags & SA_NOCLDWAIT) == 0) return;
    struct sigaction reportable {};
    reportable.sa_handler = SIG_DFL;
    sigemptyset(&reportable.sa_mask);
    changed_ = ::sigaction(SIGCHLD, &reportable, nullptr) == 0;
  }
  ~ChildrenReportable() {
    if (changed_) ::sigaction(SIGCHLD, &saved_, nullptr);
  }
  ChildrenReportable(const ChildrenReportable&) = delete;
  ChildrenReportable& operator=(const ChildrenReportable&) = delete;

 private:
  struct sigaction saved_ {};
  bool changed_ = false;
};

struct OutputPipe {
  int fd = -1;  // read end; -1 once it reached end of file
  OutputStream stream = OutputStream::kStdout;
  std::string partial;  // the current line, until its '\n' arrives
};

struct Rank {
  RankResult result;
  bool running = false;
  OutputPipe out, err;
};

void set_env(const char* name, const std::string& value) { ::setenv(name, value.c_str(), 1); }

class Run {
 public:
  // The socket is abstract (no file to leave behind) and random; the secret keeps others out.
  explicit Run(const LaunchOptions& options)
      : options_(options),
        secret_(random_hex(32)),
        server_(options.num_ranks, "@epcomm-" + random_hex(12), secret_),
        status_(options.num_ranks),
        ranks_(options.num_ranks) {
    for (int r = 0; r < options.num_ranks; ++r) {
      ranks_[r].result.rank = r;
      ranks_[r].out.stream = OutputStream::kStdout;
      ranks_[r].err.stream = OutputStream::kStderr;
    }
  }

  // Leaves nothing running, whatever happened (an exception included).
  ~Run() {
    for (Rank& rank : ranks_) {
      if (rank.running) {
        ::kill(rank.result.pid, SIGKILL);
        while (::waitpid(rank.result.pid, nullptr, 0) < 0 && errno == EINTR) {
        }
      }
      close_pipe(rank.out);
      close_pipe(rank.err);
    }
  }
  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;

  void spawn_all(const std::function<int(int)>& rank_main) {
    for (int r = 0; r < options_.num_ranks; ++r) spawn(r, rank_main);
  }

  LaunchResult wait() {
    const auto start = Clock::now();
    std::optional<Clock::time_point> drain_until;
    for (;;) {
      reap();
      const auto now = Clock::now();
      if (running_count() == 0) {
        if (!any_pipe_open()) break;
        if (!drain_until) drain_until = now + kDrainGrace;  // a grandchild may still hold a pipe
        if (now >= *drain_until) break;
      }
      check_deadlines(start, now);
      poll_once();
    }
    for (Rank& rank : ranks_) {
      close_pipe(rank.out, &rank);
      close_pipe(rank.err, &rank);
      result_.ranks.push_back(rank.result);
    }
    return result_;
  }

 private:
  void spawn(int rank, const std::function<int(int)>& rank_main) {
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0) throw_system("pipe");
    if (::pipe2(err, O_CLOEXEC) != 0) {
      ::close(out[0]);
      ::close(out[1]);
      throw_system("pipe");
    }
    // Anything buffered now would be written a second time by the child.
    std::cout.flush();
    std::cerr.flush();
    std::fflush(nullptr);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid == 0) become_rank(rank, parent, out[1], err[1], rank_main);
    ::close(out[1]);
    ::close(err[1]);
    if (pid < 0) {
      ::close(out[0]);
      ::close(err[0]);
      throw_system("fork");
    }
    ::fcntl(out[0], F_SETFL, O_NONBLOCK);
    ::fcntl(err[0], F_SETFL, O_NONBLOCK);
    Rank& r = ranks_[rank];
    r.result.pid = pid;
    r.running = true;
    r.out.fd = out[0];
    r.err.fd = err[0];
  }

  // In the child: wire up stdio and the environment, run, and leave without running anything of
  // the parent's (atexit handlers, static destructors, gtest's teardown).
  [[noreturn]] void become_rank(int rank, pid_t parent, int out_fd, int err_fd,
                                const std::function<int(int)>& rank_main) {
    // A rank must not outlive its launcher (killed, or a test binary stopped by ctest's timeout).
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);
    ::dup2(out_fd, STDOUT_FILENO);
    ::dup2(err_fd, STDERR_FILENO);
    const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null_fd >= 0) ::dup2(null_fd, STDIN_FILENO);
    for (const Rank& other : ranks_) {
      if (other.out.fd >= 0) ::close(other.out.fd);
      if (other.err.fd >= 0) ::close(other.err.fd);
    }
    server_.close_fds_in_child();
    set_env("EPCOMM_RANK", std::to_string(rank));
    set_env("EPCOMM_WORLD_SIZE", std::to_string(options_.num_ranks));
    set_env("EPCOMM_LOCAL_RANK", std::to_string(rank));
    set_env("EPCOMM_LOCAL_WORLD_SIZE", std::to_string(options_.num_ranks));
    set_env("EPCOMM_BOOTSTRAP", server_.address());
    set_env("EPCOMM_BOOTSTRAP_SECRET", secret_);
    status_.inherit();
    set_env(job_status::kFdVariable, std::to_string(status_.fd()));
    int status = 1;
    try {
      status = rank_main(rank);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank %d: uncaught exception: %s\n", rank, e.what());
    } catch (...) {
      std::fprintf(stderr, "rank %d: uncaught exception of unknown type\n", rank);
    }
    std::cout.flush();
    std::cerr.flush();
    std::fflush(nullptr);
    ::_exit(status & 0xff);
  }

  void reap() {
    for (Rank& rank : ranks_) {
      if (!rank.running) continue;
      int status = 0;
      const pid_t got = ::waitpid(rank.result.pid, &status, WNOHANG);
      if (got != rank.result.pid) continue;
      rank.running = false;
      RankResult& r = rank.result;
      r.exited = WIFEXITED(status);
      r.exit_code = r.exited ? WEXITSTATUS(status) : 0;
      r.signaled = WIFSIGNALED(status);
      r.signal = r.signaled ? WTERMSIG(status) : 0;
      // Peers read this as "rank 3 exited with code 1" / "rank 3 exited: killed by signal 9 (SIGKILL)".
      const std::string how =
          r.exited ? r.how() : concat("exited: killed by signal ", r.signal, " (", signal_name(r.signal), ")");
      status_.mark_ended(r.rank, how);  // for peers waiting in shared memory (JobMonitor)
      server_.rank_ended(r.rank, how);  // for peers waiting in the bootstrap
      if (!r.ok() && !r.stopped_by_launcher && result_.first_failure < 0) {
        result_.first_failure = r.rank;
        failure_seen_at_ = Clock::now();
      }
    }
  }

  void check_deadlines(Clock::time_point start, Clock::time_point now) {
    if (stopping_) {
      if (!killed_ && now >= kill_at_) {
        signal_running(SIGKILL);
        killed_ = true;
      }
      return;
    }
    if (options_.timeout.count() > 0 && now - start >= options_.timeout) {
      result_.timed_out = !failure_seen_at_;  // else the failure ended the run, the timeout only cut its grace
      begin_stop(now);
    } else if (options_.stop_requested != nullptr && *options_.stop_requested != 0) {
      result_.stop_requested = true;
      begin_stop(now);
    } else if (failure_seen_at_ && now - *failure_seen_at_ >= options_.failure_grace) {
      begin_stop(now);
    }
  }

  void begin_stop(Clock::time_point now) {
    result_.bootstrap_waiting = server_.waiting_summary();
    stopping_ = true;
    kill_at_ = now + options_.kill_grace;
    signal_running(SIGTERM);
  }

  void signal_running(int signal) {
    for (Rank& rank : ranks_) {
      if (!rank.running) continue;
      rank.result.stopped_by_launcher = true;
      ::kill(rank.result.pid, signal);
    }
  }

  void poll_once() {
    std::vector<pollfd> fds;
    std::vector<std::pair<Rank*, OutputPipe*>> pipes;
    for (Rank& rank : ranks_) {
      for (OutputPipe* p : {&rank.out, &rank.err}) {
        if (p->fd < 0) continue;
        fds.push_back({p->fd, POLLIN, 0});
        pipes.emplace_back(&rank, p);
      }
    }
    const size_t server_begin = fds.size();
    server_.add_poll_fds(fds);
    const int n = ::poll(fds.data(), fds.size(), kPollIntervalMs);
    if (n < 0) {
      if (errno == EINTR) return;
      throw_system("poll");
    }
    for (size_t i = 0; i < pipes.size(); ++i)
      if (fds[i].revents != 0) read_pipe(*pipes[i].first, *pipes[i].second);
    server_.handle(std::span<const pollfd>(fds).subspan(server_begin));
  }

  void read_pipe(Rank& rank, OutputPipe& pipe) {
    char chunk[1 << 16];
    const ssize_t n = ::read(pipe.fd, chunk, sizeof(chunk));
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) return;
      close_pipe(pipe, &rank);
      return;
    }
    if (n == 0) {
      close_pipe(pipe, &rank);
      return;
    }
    for (ssize_t i = 0; i < n; ++i) {
      if (chunk[i] == '\n') {
        emit(rank, pipe.stream, pipe.partial);
        pipe.partial.clear();
      } else {
        pipe.partial.push_back(chunk[i]);
        if (pipe.partial.size() >= kMaxLineBytes) {
          emit(rank, pipe.stream, pipe.partial);
          pipe.partial.clear();
        }
      }
    }
  }

  // Closes a pipe; with `rank`, an unfinished last line is reported first.
  void close_pipe(OutputPipe& pipe, Rank* rank = nullptr) {
    if (pipe.fd < 0) return;
    ::close(pipe.fd);
    pipe.fd = -1;
    if (rank != nullptr && !pipe.partial.empty()) emit(*rank, pipe.stream, pipe.partial);
    pipe.partial.clear();
  }

  void emit(Rank& rank, OutputStream stream, const std::string& line) {
    if (options_.on_line) options_.on_line(rank.result.rank, stream, line);
    if (options_.tail_lines == 0) return;
    rank.result.tail.push_back(line);
    if (rank.result.tail.size() > options_.tail_lines) rank.result.tail.pop_front();
  }

  int running_count() const {
    int n = 0;
    for (const Rank& rank : ranks_) n += rank.running ? 1 : 0;
    return n;
  }

  bool any_pipe_open() const {
    for (const Rank& rank : ranks_)
      if (rank.out.fd >= 0 || rank.err.fd >= 0) return true;
    return false;
  }

  const LaunchOptions& options_;
  ChildrenReportable reportable_;  // before anything is forked; restored after every rank is reaped
  std::string secret_;
  BootstrapServer server_;
  JobStatusPage status_;
  std::vector<Rank> ranks_;
  LaunchResult result_;
  std::optional<Clock::time_point> failure_seen_at_;
  bool stopping_ = false;
  bool killed_ = false;
  Clock::time_point kill_at_;
};

void check_options(const LaunchOptions& options) {
  if (options.num_ranks < 1)
    throw std::invalid_argument(concat("epcomm launcher: num_ranks: expected >= 1, got ", options.num_ranks));
}

}  // namespace

std::string signal_name(int signal) {
  static const std::pair<int, const char*> kNames[] = {
      {SIGHUP, "SIGHUP"},   {SIGINT, "SIGINT"},   {SIGQUIT, "SIGQUIT"}, {SIGILL, "SIGILL"},   {SIGTRAP, "SIGTRAP"},
      {SIGABRT, "SIGABRT"}, {SIGBUS, "SIGBUS"},   {SIGFPE, "SIGFPE"},   {SIGKILL, "SIGKILL"}, {SIGUSR1, "SIGUSR1"},
      {SIGSEGV, "SIGSEGV"}, {SIGUSR2, "SIGUSR2"}, {SIGPIPE, "SIGPIPE"}, {SIGALRM, "SIGALRM"}, {SIGTERM, "SIGTERM"},
      {SIGXCPU, "SIGXCPU"}, {SIGXFSZ, "SIGXFSZ"}, {SIGSYS, "SIGSYS"},
  };
  for (const auto& [number, name] : kNames)
    if (number == signal) return name;
  return concat("signal ", signal);
}

std::string RankResult::how() const {
  if (exited) return concat("exited with code ", exit_code);
  if (signaled) return concat("was killed by signal ", signal, " (", signal_name(signal), ")");
  return "is still running";
}

bool LaunchResult::ok() const {
  if (timed_out || stop_requested) return false;
  for (const RankResult& r : ranks)
    if (!r.ok()) return false;
  return true;
}

std::vector<int> LaunchResult::failed_ranks() const {
  std::vector<int> failed;
  for (const RankResult& r : ranks)
    if (!r.ok()) failed.push_back(r.rank);
  return failed;
}

LaunchResult launch_functions(const LaunchOptions& options, const std::function<int(int rank)>& rank_main) {
  check_options(options);
  Run run(options);
  run.spawn_all(rank_main);
  return run.wait();
}

LaunchResult launch_program(const LaunchOptions& options, const std::vector<std::string>& argv) {
  if (argv.empty()) throw std::invalid_argument("epcomm launcher: no program to run");
  return launch_functions(options, [&argv](int) {
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "epcomm-run: cannot run '%s': %s\n", args[0], std::strerror(errno));
    return 127;
  });
}

}  // namespace epcomm::launch
