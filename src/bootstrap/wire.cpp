#include "bootstrap/wire.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "core/check.hpp"

namespace epcomm::wire {
namespace {

// Waits until `fd` is ready for `events` or the deadline passes (then asks `on_expire`).
void wait_ready(int fd, short events, Clock::time_point& deadline, const ExpiryHandler& on_expire,
                const std::string& what) {
  for (;;) {
    const auto now = Clock::now();
    if (now >= deadline) {
      deadline = on_expire();  // throws, or grants more time
      continue;
    }
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count();
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1'000'000)));
    if (n > 0) return;  // ready, or an error/hang-up that the next send/recv reports
    if (n < 0 && errno != EINTR)
      throw_error(ErrorCode::kInternal, concat(what, ": poll failed: ", std::strerror(errno)));
  }
}

[[noreturn]] void throw_closed(const std::string& what) {
  throw_error(ErrorCode::kPeerFailure,
              concat(what,
                     ": the bootstrap server closed the connection (did epcomm-run, or rank 0 of a tcp "
                     "bootstrap, exit?)"));
}

}  // namespace

void send_all(int fd, const void* data, size_t bytes, Clock::time_point& deadline, const ExpiryHandler& on_expire,
              const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::send(fd, p, bytes, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      p += n;
      bytes -= static_cast<size_t>(n);
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_ready(fd, POLLOUT, deadline, on_expire, what);
    } else if (errno == EPIPE || errno == ECONNRESET) {
      throw_closed(what);
    } else if (errno != EINTR) {
      throw_error(ErrorCode::kInternal, concat(what, ": send failed: ", std::strerror(errno)));
    }
  }
}

void receive_all(int fd, void* data, size_t bytes, Clock::time_point& deadline, const ExpiryHandler& on_expire,
                 const std::string& what) {
  char* p = static_cast<char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::recv(fd, p, bytes, MSG_DONTWAIT);
    if (n > 0) {
      p += n;
      bytes -= static_cast<size_t>(n);
    } else if (n == 0 || errno == ECONNRESET) {
      throw_closed(what);
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_ready(fd, POLLIN, deadline, on_expire, what);
    } else if (errno != EINTR) {
      throw_error(ErrorCode::kInternal, concat(what, ": recv failed: ", std::strerror(errno)));
    }
  }
}

}  // namespace epcomm::wire
