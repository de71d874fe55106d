// The bootstrap of processes started by epcomm-run (or by the test harness): a client of the
// bootstrap server over a unix socket (protocol in wire.hpp), plus the trivial one-rank group.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "bootstrap/wire.hpp"
#include "core/check.hpp"
#include "core/environment.hpp"
#include "core/timeout.hpp"
#include "epcomm/bootstrap.hpp"

namespace epcomm {
namespace {

using wire::Clock;

// After our own timeout we ask the server who is missing; this is how long we wait for the answer.
constexpr std::chrono::milliseconds kStatusGrace{1000};
// Longest error or status text we accept from the server.
constexpr uint64_t kMaxTextBytes = 1 << 20;

class SingleRankBootstrap final : public Bootstrap {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_gather(const void* send, void* recv, size_t bytes) override {
    if (bytes > 0 && send != recv) std::memmove(recv, send, bytes);
  }
  void barrier() override {}
};

// The server sends error codes as integers; anything unknown becomes kInternal.
ErrorCode code_from_wire(int32_t value) {
  const bool known =
      value >= static_cast<int32_t>(ErrorCode::kInvalidArgument) && value <= static_cast<int32_t>(ErrorCode::kInternal);
  return known ? static_cast<ErrorCode>(value) : ErrorCode::kInternal;
}

int64_t elapsed_ms(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
}

// A client of the bootstrap server. One per process and rank, kept for the whole run (the server
// takes a closed connection to mean the rank is gone). Not thread-safe: one collective at a time.
class SocketBootstrap final : public Bootstrap {
 public:
  SocketBootstrap(int rank, int size, const std::string& socket_path, std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), timeout_(timeout) {
    connect_to(socket_path);
    greet();
  }
  ~SocketBootstrap() override {
    if (fd_ >= 0) ::close(fd_);
  }
  SocketBootstrap(const SocketBootstrap&) = delete;
  SocketBootstrap& operator=(const SocketBootstrap&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_gather(const void* send, void* recv, size_t bytes) override {
    collective(wire::CollectiveOp::kAllGather, send, recv, bytes);
  }
  void barrier() override { collective(wire::CollectiveOp::kBarrier, nullptr, nullptr, 0); }

 private:
  std::string who() const { return concat("bootstrap (rank ", rank_, " of ", size_, ")"); }

  // Retries while the server's socket does not exist yet or its backlog is full.
  void connect_to(const std::string& path) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    require(path.size() < sizeof(addr.sun_path), "bootstrap_from_env", "EPCOMM_BOOTSTRAP", "socket path longer than ",
            sizeof(addr.sun_path) - 1, " bytes: '", path, "'");
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    const auto start = Clock::now();
    for (;;) {
      fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      if (fd_ < 0) throw_error(ErrorCode::kInternal, concat(who(), ": socket failed: ", std::strerror(errno)));
      if (::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) return;
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      const bool retry = err == ENOENT || err == ECONNREFUSED || err == EAGAIN || err == EINTR;
      if (!retry)
        throw_error(ErrorCode::kInternal, concat(who(), ": connect to '", path, "' failed: ", std::strerror(err)));
      if (Clock::now() - start >= timeout_)
        throw_error(ErrorCode::kTimeout, concat(who(), ": could not connect to the bootstrap server at '", path,
                                                "' within ", timeout_.count(), " ms: ", std::strerror(err)));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  void greet() {
    const auto start = Clock::now();
    auto deadline = start + timeout_;
    const std::string what = who() + " hello";
    auto give_up = [&]() -> Clock::time_point {
      throw_error(ErrorCode::kTimeout,
                  concat(what, ": the bootstrap server did not answer within ", timeout_.count(), " ms"));
    };
    send_header({.kind = wire::MessageKind::kHello, .rank = rank_, .aux = size_}, deadline, give_up, what);
    const wire::Header reply = receive_header(deadline, give_up, what);
    if (reply.kind == wire::MessageKind::kError) {
      const std::string text = receive_text(reply, deadline, give_up, what);
      throw_error(code_from_wire(reply.aux), concat(what, ": ", text));
    }
    if (reply.kind != wire::MessageKind::kWelcome) protocol_error(what, reply);
  }

  void collective(wire::CollectiveOp op, const void* send, void* recv, size_t bytes) {
    if (!unusable_.empty()) throw_error(unusable_code_, unusable_);
    const uint64_t sequence = next_sequence_++;
    const std::string what =
        concat("bootstrap ", wire::to_string(op), " #", sequence, " (rank ", rank_, " of ", size_, ")");
    require(bytes <= wire::kMaxContributionBytes, what.c_str(), "bytes", "expected at most ",
            wire::kMaxContributionBytes, ", got ", bytes);
    const auto start = Clock::now();
    auto deadline = start + timeout_;
    bool sent = false, queried = false;
    // Our deadline passed: ask the server who has not arrived (it knows, we do not), once.
    auto on_expire = [&]() -> Clock::time_point {
      if (!sent) on_expire_fail(what, start)();
      if (queried)
        throw_error(ErrorCode::kTimeout, concat(what, ": timed out after ", elapsed_ms(start),
                                                " ms (the bootstrap server did not say which ranks are missing)"));
      queried = true;
      auto query_deadline = Clock::now() + kStatusGrace;
      send_header({.kind = wire::MessageKind::kQuery, .rank = rank_, .sequence = sequence}, query_deadline,
                  on_expire_fail(what, start), what);
      return Clock::now() + kStatusGrace;
    };
    try {
      send_header({.kind = wire::MessageKind::kCollective,
                   .rank = rank_,
                   .aux = static_cast<int32_t>(op),
                   .sequence = sequence,
                   .bytes = bytes},
                  deadline, on_expire, what);
      if (bytes > 0) wire::send_all(fd_, send, bytes, deadline, on_expire, what);
      sent = true;
      receive_reply(sequence, recv, bytes, deadline, on_expire, what, start);
    } catch (const Error& e) {
      // A timeout leaves the stream mid-conversation and a lost peer is permanent: refuse later calls.
      if (e.code() != ErrorCode::kInvalidArgument && unusable_.empty()) {
        unusable_code_ = e.code();
        unusable_ = concat(who(), ": unusable after an earlier failure: ", e.what());
      }
      throw;
    }
  }

  void receive_reply(uint64_t sequence, void* recv, size_t bytes, Clock::time_point& deadline,
                     const wire::ExpiryHandler& on_expire, const std::string& what, Clock::time_point start) {
    for (;;) {
      const wire::Header h = receive_header(deadline, on_expire, what);
      if (h.kind == wire::MessageKind::kResult && h.sequence == sequence &&
          h.bytes == static_cast<uint64_t>(size_) * bytes) {
        if (h.bytes > 0) wire::receive_all(fd_, recv, h.bytes, deadline, on_expire, what);
        return;
      }
      if (h.kind == wire::MessageKind::kError && h.sequence == sequence) {
        const std::string text = receive_text(h, deadline, on_expire, what);
        throw_error(code_from_wire(h.aux), concat(what, ": ", text));
      }
      if (h.kind == wire::MessageKind::kStatus) {
        const std::string text = receive_text(h, deadline, on_expire, what);
        if (h.sequence != sequence) continue;  // the answer to an earlier query, arrived late
        throw_error(ErrorCode::kTimeout, concat(what, ": timed out after ", elapsed_ms(start), " ms; ", text));
      }
      protocol_error(what, h);
    }
  }

  wire::ExpiryHandler on_expire_fail(const std::string& what, Clock::time_point start) {
    return [what, start]() -> Clock::time_point {
      throw_error(ErrorCode::kTimeout,
                  concat(what, ": timed out after ", elapsed_ms(start), " ms (the bootstrap server is not reading)"));
    };
  }

  void send_header(const wire::Header& h, Clock::time_point& deadline, const wire::ExpiryHandler& on_expire,
                   const std::string& what) {
    unsigned char raw[wire::kHeaderBytes];
    wire::encode(h, raw);
    wire::send_all(fd_, raw, sizeof(raw), deadline, on_expire, what);
  }

  wire::Header receive_header(Clock::time_point& deadline, const wire::ExpiryHandler& on_expire,
                              const std::string& what) {
    unsigned char raw[wire::kHeaderBytes];
    wire::receive_all(fd_, raw, sizeof(raw), deadline, on_expire, what);
    const wire::Header h = wire::decode(raw);
    if (h.magic != wire::kMagic) protocol_error(what, h);
    return h;
  }

  std::string receive_text(const wire::Header& h, Clock::time_point& deadline, const wire::ExpiryHandler& on_expire,
                           const std::string& what) {
    if (h.bytes > kMaxTextBytes) protocol_error(what, h);
    std::string text(h.bytes, '\0');
    if (h.bytes > 0) wire::receive_all(fd_, text.data(), h.bytes, deadline, on_expire, what);
    return text;
  }

  [[noreturn]] void protocol_error(const std::string& what, const wire::Header& h) {
    throw_error(ErrorCode::kInternal,
                concat(what, ": unexpected message from the bootstrap server (magic 0x", std::hex, h.magic, std::dec,
                       ", kind ", static_cast<uint32_t>(h.kind), ", sequence ", h.sequence, ", ", h.bytes,
                       " bytes); is epcomm-run from the same epcomm version?"));
  }

  int fd_ = -1;
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  uint64_t next_sequence_ = 0;
  std::string unusable_;  // set once a collective failed in a way that cannot be recovered from
  ErrorCode unusable_code_ = ErrorCode::kInternal;
};

// A variable epcomm-run sets: its value through the table (core/environment.cpp), required here.
template <class T>
T required(const std::optional<T>& value, const char* name) {
  require(value.has_value(), "bootstrap_from_env", name,
          "not set (start the program with `epcomm-run -n N program ...`)");
  return *value;
}

}  // namespace

std::unique_ptr<Bootstrap> bootstrap_from_env(std::chrono::milliseconds timeout) {
  const int size = static_cast<int>(required(env_int("EPCOMM_WORLD_SIZE"), "EPCOMM_WORLD_SIZE"));
  const int rank = static_cast<int>(required(env_int("EPCOMM_RANK"), "EPCOMM_RANK"));
  require(rank < size, "bootstrap_from_env", "EPCOMM_RANK", "expected an integer in [0, ", size - 1, "], got '", rank,
          "' (EPCOMM_WORLD_SIZE = ", size, ")");
  const std::string address_string = required(env_text("EPCOMM_BOOTSTRAP"), "EPCOMM_BOOTSTRAP");
  const char* address_text = address_string.c_str();
  wire::Address address;
  require(wire::parse_address(address_text, address), "bootstrap_from_env", "EPCOMM_BOOTSTRAP",
          "expected 'unix:<socket path>', got '", address_text, "'");
  if (address.transport != wire::Address::Transport::kUnix)
    throw_error(ErrorCode::kUnsupported,
                concat("bootstrap_from_env: EPCOMM_BOOTSTRAP: tcp addresses (multi-node) are not supported yet, got '",
                       address_text, "'"));
  return std::make_unique<SocketBootstrap>(rank, size, address.location, resolve_timeout(timeout));
}

std::unique_ptr<Bootstrap> single_rank_bootstrap() { return std::make_unique<SingleRankBootstrap>(); }

}  // namespace epcomm
