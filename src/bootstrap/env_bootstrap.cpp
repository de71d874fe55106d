// The bootstrap of processes started by epcomm-run (or by the test harness): a client of the
// bootstrap server over a unix socket (protocol in wire.hpp); the TCP bootstrap of ranks on several
// hosts (torchrun, SLURM), whose rank 0 runs the same server in a thread; the one-rank group.
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <thread>

#include "bootstrap/serving_thread.hpp"
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
  // `address` is a unix socket path ('@' first: abstract) or, with `tcp`, "host:port".
  SocketBootstrap(int rank, int size, const wire::Address& address, std::string secret,
                  std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), timeout_(timeout), secret_(std::move(secret)) {
    require(secret_.size() <= wire::kMaxSecretBytes, "bootstrap", "EPCOMM_BOOTSTRAP_SECRET", "expected at most ",
            wire::kMaxSecretBytes, " bytes, got ", secret_.size());
    try {
      if (address.transport == wire::Address::Transport::kTcp)
        connect_tcp(address.location);
      else
        connect_unix(address.location);
      greet();
    } catch (...) {  // a constructor that throws runs no destructor: close the socket here
      if (fd_ >= 0) ::close(fd_);
      fd_ = -1;
      throw;
    }
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
  void connect_unix(const std::string& path) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    require(path.size() < sizeof(addr.sun_path), "bootstrap_from_env", "EPCOMM_BOOTSTRAP", "socket path longer than ",
            sizeof(addr.sun_path) - 1, " bytes: '", path, "'");
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    const bool abstract = path.starts_with('@');
    if (abstract) addr.sun_path[0] = '\0';
    const socklen_t length = abstract ? static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size())
                                      : static_cast<socklen_t>(sizeof(addr));
    const auto start = Clock::now();
    for (;;) {
      fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      if (fd_ < 0) throw_error(ErrorCode::kInternal, concat(who(), ": socket failed: ", std::strerror(errno)));
      if (::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), length) == 0) return;
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

  // Retries (rank 0 may not be listening yet) until the timeout; each attempt is bounded too.
  void connect_tcp(const std::string& host_port) {
    std::string host;
    int port = 0;
    wire::split_host_port(host_port, host, port);
    const auto start = Clock::now();
    std::string last_error = "no attempt";
    for (;;) {
      if (try_connect_tcp(host, port, start + timeout_, last_error)) return;
      if (Clock::now() - start >= timeout_)
        throw_error(ErrorCode::kTimeout, concat(who(), ": could not connect to the bootstrap server (rank 0) at ",
                                                host_port, " within ", timeout_.count(), " ms: ", last_error));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  bool try_connect_tcp(const std::string& host, int port, Clock::time_point deadline, std::string& last_error) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    const int status = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
    if (status != 0) {
      last_error = concat("cannot resolve '", host, "': ", ::gai_strerror(status));
      return false;
    }
    for (addrinfo* a = found; a != nullptr && fd_ < 0; a = a->ai_next) {
      const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
      if (fd < 0) continue;
      if (connect_before(fd, a->ai_addr, a->ai_addrlen, deadline, last_error)) {
        const int on = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
        fd_ = fd;
      } else {
        ::close(fd);
      }
    }
    ::freeaddrinfo(found);
    return fd_ >= 0;
  }

  static bool connect_before(int fd, const sockaddr* addr, socklen_t length, Clock::time_point deadline,
                             std::string& last_error) {
    if (::connect(fd, addr, length) == 0) return true;
    if (errno != EINPROGRESS) {
      last_error = std::strerror(errno);
      return false;
    }
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd p{fd, POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(std::clamp<int64_t>(left, 1, 1000))) <= 0) {
      last_error = "connect did not complete";
      return false;
    }
    int err = 0;
    socklen_t err_length = sizeof(err);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &err_length);
    if (err != 0) last_error = std::strerror(err);
    return err == 0;
  }

  void greet() {
    const auto start = Clock::now();
    auto deadline = start + timeout_;
    const std::string what = who() + " hello";
    auto give_up = [&]() -> Clock::time_point {
      throw_error(ErrorCode::kTimeout,
                  concat(what, ": the bootstrap server did not answer within ", timeout_.count(), " ms"));
    };
    send_header({.kind = wire::MessageKind::kHello, .rank = rank_, .aux = size_, .bytes = secret_.size()}, deadline,
                give_up, what);
    if (!secret_.empty()) wire::send_all(fd_, secret_.data(), secret_.size(), deadline, give_up, what);
    const wire::Header reply = receive_header(deadline, give_up, what);
    if (reply.kind == wire::MessageKind::kError) {
      const std::string text = receive_text(reply, deadline, give_up, what);
      throw_error(code_from_wire(reply.aux), concat(what, ": ", text));
    }
    if (reply.kind != wire::MessageKind::kWelcome) protocol_error(what, reply);
  }

  void collective(wire::CollectiveOp op, const void* send, void* recv, size_t bytes) {
    if (!unusable_.empty()) throw_error(unusable_code_, unusable_);
    const std::string what =
        concat("bootstrap ", wire::to_string(op), " #", next_sequence_, " (rank ", rank_, " of ", size_, ")");
    const std::string too_big = wire::size_refusal(bytes, size_);
    require(too_big.empty(), what.c_str(), "bytes", too_big);  // before the call is numbered: nothing sent
    const uint64_t sequence = next_sequence_++;
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
  std::string secret_;
  uint64_t next_sequence_ = 0;
  std::string unusable_;  // set once a collective failed in a way that cannot be recovered from
  ErrorCode unusable_code_ = ErrorCode::kInternal;
};

// Rank 0 of a TCP group: serves the group in a thread and is a client of its own server.
class TcpBootstrap final : public Bootstrap {
 public:
  TcpBootstrap(int rank, int size, const std::string& host, int port, const std::string& secret,
               std::chrono::milliseconds timeout) {
    if (rank == 0) {
      server_ = std::make_unique<ServingThread>(size, port, secret, timeout);
      client_ = std::make_unique<SocketBootstrap>(
          rank, size, wire::Address{wire::Address::Transport::kTcp, concat("127.0.0.1:", server_->port())}, secret,
          timeout);
    } else {
      client_ = std::make_unique<SocketBootstrap>(
          rank, size, wire::Address{wire::Address::Transport::kTcp, concat(host, ":", port)}, secret, timeout);
    }
  }
  // The client goes first: the server then fails whatever still waits for rank 0 and drains.
  ~TcpBootstrap() override { client_.reset(); }

  int rank() const override { return client_->rank(); }
  int size() const override { return client_->size(); }
  void all_gather(const void* send, void* recv, size_t bytes) override { client_->all_gather(send, recv, bytes); }
  void barrier() override { client_->barrier(); }

 private:
  std::unique_ptr<ServingThread> server_;  // rank 0 only
  std::unique_ptr<Bootstrap> client_;
};

// A variable through the table (core/environment.cpp), required here.
template <class T>
T required(const std::optional<T>& value, const char* name, const char* op = "bootstrap_from_env",
           const char* hint = "start the program with `epcomm-run -n N program ...`") {
  require(value.has_value(), op, name, "not set (", hint, ")");
  return *value;
}

// The first of `names` that is set, or nullptr.
const char* first_set(std::initializer_list<const char*> names) {
  for (const char* name : names)
    if (env_int(name).has_value()) return name;
  return nullptr;
}

// Without $EPCOMM_BOOTSTRAP_SECRET: a token every rank of this job derives alike and another job
// does not (its run id, master address, port and size). It keeps out stray processes of other
// jobs; against other users, set EPCOMM_BOOTSTRAP_SECRET.
std::string derived_secret(const std::string& host, int port, int size) {
  std::string basis = concat("epcomm-tcp|", host, "|", port, "|", size);
  for (const char* name : {"TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID"})
    if (const std::optional<std::string> value = env_text(name)) basis += concat("|", name, "=", *value);
  uint64_t a = 0xcbf29ce484222325ull, b = 0x84222325cbf29ce4ull;  // two FNV-1a streams
  for (unsigned char c : basis) {
    a = (a ^ c) * 0x100000001b3ull;
    b = (b ^ (c + 0x5bu)) * 0x100000001b3ull;
  }
  return concat("derived-", std::hex, a, b);
}

std::string secret_from_env() { return env_text("EPCOMM_BOOTSTRAP_SECRET").value_or(""); }

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
          "expected 'unix:<socket path>' or 'tcp:<host>:<port>', got '", address_text, "'");
  if (address.transport == wire::Address::Transport::kTcp) {
    std::string host;
    int port = 0;
    wire::split_host_port(address.location, host, port);
    const std::optional<std::string> secret = env_text("EPCOMM_BOOTSTRAP_SECRET");
    return tcp_bootstrap(rank, size, host, port, secret ? *secret : derived_secret(host, port, size), timeout);
  }
  return std::make_unique<SocketBootstrap>(rank, size, address, secret_from_env(), resolve_timeout(timeout));
}

std::unique_ptr<Bootstrap> tcp_bootstrap(int rank, int size, const std::string& host, int port,
                                         const std::string& secret, std::chrono::milliseconds timeout) {
  require(size >= 1, "tcp_bootstrap", "size", "expected >= 1, got ", size);
  require(rank >= 0 && rank < size, "tcp_bootstrap", "rank", "expected in [0, ", size, "), got ", rank);
  require(!host.empty(), "tcp_bootstrap", "host", "expected the address of rank 0's host, got ''");
  require(port >= 1 && port <= 65535, "tcp_bootstrap", "port", "expected in [1, 65535], got ", port);
  return std::make_unique<TcpBootstrap>(rank, size, host, port, secret, resolve_timeout(timeout));
}

std::unique_ptr<Bootstrap> tcp_bootstrap_from_env(std::chrono::milliseconds timeout) {
  constexpr const char* kOp = "tcp_bootstrap_from_env";
  constexpr const char* kHint = "set by torchrun; under srun set MASTER_ADDR to the first node";
  const char* size_name = first_set({"WORLD_SIZE", "SLURM_NTASKS"});
  const char* rank_name = first_set({"RANK", "SLURM_PROCID"});
  size_name = size_name ? size_name : "WORLD_SIZE";
  rank_name = rank_name ? rank_name : "RANK";
  const int size = static_cast<int>(required(env_int(size_name), size_name, kOp, kHint));
  const int rank = static_cast<int>(required(env_int(rank_name), rank_name, kOp, kHint));
  require(rank < size, kOp, rank_name, "expected an integer in [0, ", size - 1, "], got '", rank, "'");
  if (const std::optional<int64_t> local = env_int("LOCAL_WORLD_SIZE"))  // the node size: checked early
    require(*local <= size, kOp, "LOCAL_WORLD_SIZE", "expected an integer in [1, ", size, "], got '", *local, "'");
  const std::string host = required(env_text("MASTER_ADDR"), "MASTER_ADDR", kOp, kHint);
  // MASTER_PORT itself is torch.distributed's store (torchrun's agent listens there): take the next.
  const std::optional<int64_t> explicit_port = env_int("EPCOMM_BOOTSTRAP_PORT");
  const int port = static_cast<int>(explicit_port ? *explicit_port
                                                  : required(env_int("MASTER_PORT"), "MASTER_PORT", kOp, kHint) + 1);
  const std::optional<std::string> secret = env_text("EPCOMM_BOOTSTRAP_SECRET");
  return tcp_bootstrap(rank, size, host, port, secret ? *secret : derived_secret(host, port, size), timeout);
}

std::unique_ptr<Bootstrap> single_rank_bootstrap() { return std::make_unique<SingleRankBootstrap>(); }

}  // namespace epcomm
