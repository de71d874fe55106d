#include "bootstrap/serving_thread.hpp"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "core/check.hpp"
#include "launcher/bootstrap_server.hpp"

namespace epcomm {
namespace {

// After the serving rank is done, how long replies still queued for slower ranks may take to leave.
constexpr std::chrono::milliseconds kDrainGrace{2000};
constexpr int kPollMs = 100;

}  // namespace

ServingThread::ServingThread(int world_size, int port, const std::string& secret,
                             std::chrono::milliseconds hello_deadline) {
  try {
    server_ = launch::BootstrapServer::listen_tcp(world_size, port, secret);
    server_->limit_hello_deadline(hello_deadline);
  } catch (const std::runtime_error& e) {
    throw_error(ErrorCode::kInternal, concat("tcp bootstrap (rank 0 serves): ", e.what()));
  }
  port_ = server_->port();
  if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0)
    throw_error(ErrorCode::kInternal, "tcp bootstrap (rank 0 serves): pipe2 failed");
  thread_ = std::thread([this] { serve(); });
}

ServingThread::~ServingThread() {
  const char stop = 1;
  if (::write(wake_[1], &stop, 1) != 1) std::fprintf(stderr, "epcomm: tcp bootstrap: cannot stop the server\n");
  thread_.join();
  ::close(wake_[0]);
  ::close(wake_[1]);
}

void ServingThread::serve() {
  using Clock = std::chrono::steady_clock;
  bool stopping = false;
  Clock::time_point stop_by;
  try {
    for (;;) {
      if (stopping && (!server_->sending() || Clock::now() >= stop_by)) break;
      std::vector<pollfd> fds;
      server_->add_poll_fds(fds);
      // The stop byte is never read: once stopping, the pipe stays readable and must not be polled.
      const bool watch_stop = !stopping;
      if (watch_stop) fds.push_back({wake_[0], POLLIN, 0});
      const int n = ::poll(fds.data(), fds.size(), kPollMs);
      if (n < 0) continue;  // EINTR; a quiet turn still goes to handle(), for the hello deadlines
      if (watch_stop) {
        if (fds.back().revents != 0) {
          stopping = true;
          stop_by = Clock::now() + kDrainGrace;
        }
        fds.pop_back();
      }
      server_->handle(fds);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "epcomm: tcp bootstrap server stopped: %s\n", e.what());
  }
  server_.reset();  // closes every connection: the other ranks hear that rank 0 left
}

}  // namespace epcomm
