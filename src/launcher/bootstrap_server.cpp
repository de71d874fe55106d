#include "launcher/bootstrap_server.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <stdexcept>

#include "core/check.hpp"  // concat (header-only use)

namespace epcomm::launch {
namespace {

constexpr size_t kDiscardChunk = 1 << 16;
constexpr int kReadsPerTurn = 64;  // bounds the time one busy client can hold the loop
// Connections still without a hello, per rank of the group: room for every rank to retry a few
// times, and a bound on the descriptors a stranger can hold.
constexpr int kUnintroducedPerRank = 4;
// How long the listener is left out of poll after accept4 ran out of descriptors: the connection
// stays queued and the listener readable, so polling it at once would spin.
constexpr std::chrono::milliseconds kAcceptBackoff{100};

[[noreturn]] void throw_system(const std::string& what) {
  throw std::runtime_error(concat("epcomm bootstrap server: ", what, ": ", std::strerror(errno)));
}

std::shared_ptr<const std::vector<char>> text_payload(const std::string& text) {
  return std::make_shared<const std::vector<char>>(text.begin(), text.end());
}

// A listening TCP socket on every local address: IPv6 with IPv4 mapped where the host has IPv6,
// else IPv4 only.
int listen_tcp_socket(int port) {
  int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd >= 0) {
    const int off = 0, on = 1;
    ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    sockaddr_in6 addr{};
    addr.sin6_family = AF_INET6;
    addr.sin6_addr = in6addr_any;
    addr.sin6_port = htons(static_cast<uint16_t>(port));
    if (::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) return fd;
    if (errno == EADDRINUSE) {
      ::close(fd);
      throw_system(concat("bind TCP port ", port, " (is another job or a torch.distributed store using it?)"));
    }
    ::close(fd);
  }
  fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) throw_system("socket");
  const int on = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    throw_system(concat("bind TCP port ", port));
  }
  return fd;
}

int bound_port(int fd) {
  sockaddr_storage addr{};
  socklen_t length = sizeof(addr);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) != 0) return 0;
  if (addr.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
  return ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
}

}  // namespace

BootstrapServer::BootstrapServer(int world_size, int listen_fd, int port, std::string secret)
    : world_size_(world_size),
      secret_(std::move(secret)),
      listen_fd_(listen_fd),
      port_(port),
      fd_of_rank_(world_size, -1),
      ever_connected_(world_size, false),
      discard_(kDiscardChunk) {}

std::unique_ptr<BootstrapServer> BootstrapServer::listen_tcp(int world_size, int port, std::string secret) {
  const int fd = listen_tcp_socket(port);
  if (::listen(fd, SOMAXCONN) != 0) {
    ::close(fd);
    throw_system(concat("listen on TCP port ", port));
  }
  return std::unique_ptr<BootstrapServer>(new BootstrapServer(world_size, fd, bound_port(fd), std::move(secret)));
}

BootstrapServer::BootstrapServer(int world_size, std::string socket_path, std::string secret)
    : world_size_(world_size),
      path_(std::move(socket_path)),
      secret_(std::move(secret)),
      fd_of_rank_(world_size, -1),
      ever_connected_(world_size, false),
      discard_(kDiscardChunk) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.size() >= sizeof(addr.sun_path))
    throw std::runtime_error(
        concat("epcomm bootstrap server: socket path longer than ", sizeof(addr.sun_path) - 1, " bytes: ", path_));
  const bool abstract = path_.starts_with('@');
  std::memcpy(addr.sun_path, path_.c_str(), path_.size() + 1);
  if (abstract) addr.sun_path[0] = '\0';
  const socklen_t length = abstract ? static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path_.size())
                                    : static_cast<socklen_t>(sizeof(addr));
  const std::string shown = path_;
  if (abstract) path_.clear();  // nothing to unlink
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) throw_system("socket");
  if (::bind(listen_fd_, reinterpret_cast<const sockaddr*>(&addr), length) != 0) {
    ::close(listen_fd_);
    throw_system("bind " + shown);
  }
  if (::listen(listen_fd_, SOMAXCONN) != 0) {
    ::close(listen_fd_);
    if (!path_.empty()) ::unlink(path_.c_str());
    throw_system("listen " + shown);
  }
  address_ = "unix:" + shown;
}

BootstrapServer::~BootstrapServer() {
  for (auto& [fd, c] : clients_) ::close(fd);
  ::close(listen_fd_);
  if (!path_.empty()) ::unlink(path_.c_str());
}

void BootstrapServer::limit_hello_deadline(std::chrono::milliseconds limit) {
  hello_deadline_ = std::min(kDefaultHelloDeadline, std::max(limit, std::chrono::milliseconds(1)));
}

bool BootstrapServer::sending() const {
  for (const auto& [fd, c] : clients_)
    if (!c.closed && !c.out.empty()) return true;
  return false;
}

void BootstrapServer::close_fds_in_child() const {
  for (const auto& [fd, c] : clients_) ::close(fd);
  ::close(listen_fd_);
}

void BootstrapServer::add_poll_fds(std::vector<pollfd>& fds) const {
  if (Clock::now() >= listener_paused_until_) fds.push_back({listen_fd_, POLLIN, 0});
  for (const auto& [fd, c] : clients_)
    fds.push_back({fd, static_cast<short>(POLLIN | (c.out.empty() ? 0 : POLLOUT)), 0});
}

void BootstrapServer::handle(std::span<const pollfd> fds) {
  bool new_clients = false;
  for (const pollfd& p : fds) {
    if (p.revents == 0) continue;
    if (p.fd == listen_fd_) {
      new_clients = true;  // accepted last, so that no new descriptor is confused with a stale entry
      continue;
    }
    auto it = clients_.find(p.fd);
    if (it == clients_.end() || it->second.closed) continue;
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) read_from(it->second);
    if (!it->second.closed && (p.revents & POLLOUT)) flush(it->second);
  }
  std::erase_if(clients_, [](const auto& entry) { return entry.second.closed; });
  if (new_clients) accept_clients();
  close_late_hellos(Clock::now());
  std::erase_if(clients_, [](const auto& entry) { return entry.second.closed; });
}

void BootstrapServer::accept_clients() {
  for (;;) {
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      admit(fd);
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
      // Free a descriptor for the next try (a real rank may be queued behind strangers) and back off.
      close_oldest_unintroduced("closed for want of descriptors before its hello");
      listener_paused_until_ = Clock::now() + kAcceptBackoff;
    }
    return;  // EAGAIN: nothing more; anything else: try again next turn
  }
}

void BootstrapServer::admit(int fd) {
  if (port_ != 0) {  // small request/answer messages: do not wait to fill a segment
    const int on = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
  }
  // The oldest goes: a real rank says hello at once, so the newest is the likeliest to be one.
  if (unintroduced_clients() >= kUnintroducedPerRank * world_size_)
    close_oldest_unintroduced("closed: too many connections without a hello");
  Client fresh;  // replaces a closed entry whose descriptor number was just reused
  fresh.fd = fd;
  fresh.accepted_at = Clock::now();
  clients_.insert_or_assign(fd, std::move(fresh));
}

int BootstrapServer::unintroduced_clients() const {
  int count = 0;
  for (const auto& [fd, c] : clients_)
    if (!c.closed && c.rank < 0) ++count;
  return count;
}

void BootstrapServer::close_oldest_unintroduced(const char* why) {
  Client* oldest = nullptr;
  for (auto& [fd, c] : clients_)
    if (!c.closed && c.rank < 0 && (!oldest || c.accepted_at < oldest->accepted_at)) oldest = &c;
  if (oldest) disconnect(*oldest, why);
}

void BootstrapServer::close_late_hellos(Clock::time_point now) {
  for (auto& [fd, c] : clients_)
    if (!c.closed && c.rank < 0 && now - c.accepted_at >= hello_deadline_)
      disconnect(c, "closed: no hello within the deadline");
}

// ---- reading -------------------------------------------------------------------------------------

void BootstrapServer::read_from(Client& c) {
  for (int turn = 0; turn < kReadsPerTurn && !c.closed; ++turn) {
    ssize_t n;
    const bool in_header = c.header_got < wire::kHeaderBytes;
    if (c.close_after_flush) {
      n = ::recv(c.fd, discard_.data(), discard_.size(), MSG_DONTWAIT);
      if (n == 0) return disconnect(c, c.close_reason);
      if (n > 0) continue;
    } else if (in_header) {
      n = ::recv(c.fd, c.header + c.header_got, wire::kHeaderBytes - c.header_got, MSG_DONTWAIT);
    } else if (c.payload_buffer) {
      n = ::recv(c.fd, c.payload_buffer->data() + c.payload_offset + c.payload_got, c.incoming.bytes - c.payload_got,
                 MSG_DONTWAIT);
    } else {
      n = ::recv(c.fd, discard_.data(), std::min<uint64_t>(c.incoming.bytes - c.payload_got, discard_.size()),
                 MSG_DONTWAIT);
    }
    if (n == 0) return disconnect(c, "exited (its bootstrap connection closed)");
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      return disconnect(c, concat("exited (its bootstrap connection failed: ", std::strerror(errno), ")"));
    }
    if (in_header) {
      c.header_got += static_cast<size_t>(n);
      if (c.header_got == wire::kHeaderBytes) on_header(c);
    } else {
      c.payload_got += static_cast<uint64_t>(n);
    }
    if (!c.closed && !c.close_after_flush && c.header_got == wire::kHeaderBytes && c.payload_got == c.incoming.bytes)
      on_message(c);
  }
}

// A complete header arrived: check it and decide where its payload goes.
void BootstrapServer::on_header(Client& c) {
  c.incoming = wire::decode(c.header);
  c.payload_buffer.reset();
  c.payload_offset = 0;
  c.payload_got = 0;
  c.contributing = false;
  const wire::Header& h = c.incoming;
  if (h.magic != wire::kMagic) return protocol_error(c, "bad magic number (not an epcomm bootstrap client?)");
  if (h.kind == wire::MessageKind::kHello) {
    if (h.bytes > wire::kMaxSecretBytes)
      return protocol_error(
          c, concat("a hello carrying ", h.bytes, " bytes (a secret has at most ", wire::kMaxSecretBytes, ")"));
    if (h.bytes > 0) c.payload_buffer = std::make_shared<std::vector<char>>(h.bytes);  // the secret
    return;
  }
  if (h.kind == wire::MessageKind::kQuery) {
    // Which ranks the group waits for is not for strangers: only a rank that was let in may ask.
    if (c.rank < 0) return protocol_error(c, "a query before the hello");
    if (h.bytes != 0) return protocol_error(c, "a query carries no payload");
    return;
  }
  if (h.kind != wire::MessageKind::kCollective)
    return protocol_error(c, concat("unexpected message kind ", static_cast<uint32_t>(h.kind)));
  if (c.rank < 0) return protocol_error(c, "a collective before the hello");
  if (h.rank != c.rank) return protocol_error(c, concat("rank ", c.rank, " sent a collective as rank ", h.rank));
  on_collective_header(c);
}

// A whole message (header and payload) has been read.
void BootstrapServer::on_message(Client& c) {
  c.header_got = 0;
  switch (c.incoming.kind) {
    case wire::MessageKind::kHello:
      on_hello(c);
      break;
    case wire::MessageKind::kQuery:
      on_query(c);
      break;
    case wire::MessageKind::kCollective:
      if (c.contributing) contribution_done(c);
      break;
    default:
      break;  // refused in on_header
  }
  c.payload_buffer.reset();
  c.payload_got = 0;
  c.contributing = false;
}

void BootstrapServer::on_hello(Client& c) {
  const wire::Header& h = c.incoming;
  std::string refusal;
  const std::string_view secret =
      c.payload_buffer ? std::string_view(c.payload_buffer->data(), c.payload_buffer->size()) : std::string_view();
  if (c.rank >= 0)
    refusal = "a second hello on one connection";
  else if (!secret_.empty() && !wire::same_secret(secret, secret_))
    refusal = concat(secret.empty() ? "no" : "a wrong", " bootstrap secret (rank ", h.rank,
                     "); a rank must be started by the job's launcher, with its EPCOMM_BOOTSTRAP_SECRET");
  else if (h.aux != world_size_)
    refusal = concat("EPCOMM_WORLD_SIZE is ", h.aux, " but the launcher started ", world_size_, " ranks");
  else if (h.rank < 0 || h.rank >= world_size_)
    refusal = concat("rank ", h.rank, " is outside [0, ", world_size_, ")");
  else if (fd_of_rank_[h.rank] >= 0)
    refusal = concat("rank ", h.rank, " is already connected (a rank connects once: reuse its Bootstrap)");
  else if (departed_.count(h.rank))
    refusal = concat("rank ", h.rank,
                     " already left the group (a rank connects once: keep its Bootstrap for the "
                     "whole run)");
  if (!refusal.empty()) {
    c.close_after_flush = true;
    c.close_reason = "was disconnected by the bootstrap server: hello refused: " + refusal;
    send_text(c, wire::MessageKind::kError, 0, static_cast<int32_t>(ErrorCode::kInvalidArgument),
              "hello refused: " + refusal);
    return;
  }
  c.rank = h.rank;
  fd_of_rank_[c.rank] = c.fd;
  ever_connected_[c.rank] = true;
  send(c, {.kind = wire::MessageKind::kWelcome, .rank = c.rank}, nullptr);
}

void BootstrapServer::on_query(Client& c) {
  const uint64_t sequence = c.incoming.sequence;
  std::string text;
  if (current_ && current_->sequence == sequence && !current_->done)
    text = describe_missing(*current_);
  else
    text = concat("no collective #", sequence, " is in progress at the bootstrap server");
  send_text(c, wire::MessageKind::kStatus, sequence, 0, text);
}

// ---- collectives ---------------------------------------------------------------------------------

// The collective a contribution with `sequence` belongs to, starting it when it is the next one;
// nullptr when the contribution is not taken (the client has been answered already).
BootstrapServer::Collective* BootstrapServer::collective_for(Client& c, uint64_t sequence) {
  const wire::Header& h = c.incoming;
  if (current_ && current_->sequence == sequence) {
    if (current_->arrived[c.rank]) {
      protocol_error(c, concat("rank ", c.rank, " contributed twice to collective #", sequence));
      return nullptr;
    }
    if (current_->done) {  // it failed before this rank arrived (it cannot have succeeded without it)
      send_text(c, wire::MessageKind::kError, sequence, static_cast<int32_t>(current_->failure_code),
                current_->failure);
      return nullptr;
    }
    if (refuse_size(c, *current_)) return nullptr;
    return &*current_;
  }
  const uint64_t next = current_ ? current_->sequence + 1 : 0;
  if (sequence == next && (!current_ || current_->done)) {
    current_.emplace();
    current_->sequence = sequence;
    current_->op = h.aux == static_cast<int32_t>(wire::CollectiveOp::kBarrier) ? wire::CollectiveOp::kBarrier
                                                                               : wire::CollectiveOp::kAllGather;
    current_->bytes = h.bytes;
    current_->arrived.assign(world_size_, false);
    current_->sizes.assign(world_size_, 0);
    if (refuse_size(c, *current_)) return nullptr;  // before allocating: the result is world * bytes
    current_->result = std::make_shared<std::vector<char>>(static_cast<size_t>(h.bytes) * world_size_);
    return &*current_;
  }
  if (current_ && current_->done && !current_->failure.empty() && sequence < current_->sequence) {
    // A late rank still on an older collective of a group that has lost a rank since.
    send_text(c, wire::MessageKind::kError, sequence, static_cast<int32_t>(current_->failure_code), current_->failure);
    return nullptr;
  }
  protocol_error(c, concat("rank ", c.rank, " sent collective #", sequence, " while the group is at #",
                           current_ ? current_->sequence : 0, " (do all ranks make the same bootstrap calls?)"));
  return nullptr;
}

// An announced size beyond the caps fails the collective for every rank (naming the one that sent
// it) without allocating anything; its payload, if it comes, is dropped.
bool BootstrapServer::refuse_size(Client& c, Collective& col) {
  const std::string too_big = wire::size_refusal(c.incoming.bytes, world_size_);
  if (too_big.empty()) return false;
  col.arrived[c.rank] = true;  // so that it hears the error too
  fail(col, ErrorCode::kInvalidArgument,
       concat("rank ", c.rank, " announced ", name(col), " of ", too_big, "; refused"));
  return true;
}

void BootstrapServer::on_collective_header(Client& c) {
  Collective* col = collective_for(c, c.incoming.sequence);
  if (col == nullptr) return;  // answered already; the payload (if any) is read and dropped
  c.contributing = true;
  if (c.incoming.bytes == col->bytes && col->bytes > 0) {
    c.payload_buffer = col->result;
    c.payload_offset = static_cast<size_t>(col->bytes) * c.rank;
  }
  // A size that differs from the first contribution's is only recorded (for the error); its data
  // is dropped.
}

// Rank c.rank's contribution to the collective #c.incoming.sequence is complete.
void BootstrapServer::contribution_done(Client& c) {
  const uint64_t sequence = c.incoming.sequence;
  if (!current_ || current_->sequence != sequence) return;  // cannot happen: a new one needs this rank
  if (current_->done) {                                     // failed while the payload was arriving
    send_text(c, wire::MessageKind::kError, sequence, static_cast<int32_t>(current_->failure_code), current_->failure);
    return;
  }
  current_->arrived[c.rank] = true;
  current_->sizes[c.rank] = c.incoming.bytes;
  evaluate();
}

// Completes or fails the current collective when its outcome is known.
void BootstrapServer::evaluate() {
  if (!current_ || current_->done) return;
  Collective& col = *current_;
  const std::vector<int> missing = missing_ranks(col);
  std::vector<int> gone;
  for (int r : missing)
    if (departed_.count(r)) gone.push_back(r);
  if (!gone.empty()) return fail(col, ErrorCode::kPeerFailure, departure_text(gone));
  if (!missing.empty()) return;

  std::map<uint64_t, std::vector<int>> ranks_by_size;
  for (int r = 0; r < world_size_; ++r) ranks_by_size[col.sizes[r]].push_back(r);
  if (ranks_by_size.size() > 1) {
    std::string sizes;
    for (const auto& [bytes, ranks] : ranks_by_size)
      sizes += concat(sizes.empty() ? "" : "; ", bytes, " bytes from ", wire::name_ranks(ranks));
    return fail(col, ErrorCode::kInvalidArgument,
                concat("the ranks contributed different sizes (", sizes,
                       "); every rank must contribute the same "
                       "number of bytes"));
  }
  col.done = true;
  const wire::Header h{
      .kind = wire::MessageKind::kResult, .sequence = col.sequence, .bytes = static_cast<uint64_t>(col.result->size())};
  for (int r = 0; r < world_size_; ++r) {
    auto it = clients_.find(fd_of_rank_[r]);
    if (fd_of_rank_[r] >= 0 && it != clients_.end() && !it->second.closed) send(it->second, h, col.result);
  }
  col.result.reset();  // the clients' queues keep it alive while it is being sent
}

void BootstrapServer::fail(Collective& col, ErrorCode code, const std::string& text) {
  col.done = true;
  col.failure_code = code;
  col.failure = text;
  col.result.reset();
  for (int r = 0; r < world_size_; ++r) {
    if (!col.arrived[r] || fd_of_rank_[r] < 0) continue;
    auto it = clients_.find(fd_of_rank_[r]);
    if (it != clients_.end() && !it->second.closed)
      send_text(it->second, wire::MessageKind::kError, col.sequence, static_cast<int32_t>(code), text);
  }
}

std::string BootstrapServer::departure_text(const std::vector<int>& ranks) const {
  std::string text;
  for (int r : ranks) text += concat(text.empty() ? "" : "; ", "rank ", r, " ", departed_.at(r));
  return text + (ranks.size() == 1 ? "; it can no longer join" : "; they can no longer join");
}

std::vector<int> BootstrapServer::missing_ranks(const Collective& col) const {
  std::vector<int> missing;
  for (int r = 0; r < world_size_; ++r)
    if (!col.arrived[r]) missing.push_back(r);
  return missing;
}

std::string BootstrapServer::name(const Collective& col) const {
  return concat(wire::to_string(col.op), " #", col.sequence);
}

std::string BootstrapServer::describe_missing(const Collective& col) const {
  const std::vector<int> missing = missing_ranks(col);
  std::vector<int> never;
  for (int r : missing)
    if (!ever_connected_[r]) never.push_back(r);
  std::string text = concat("waiting for ", wire::name_ranks(missing));
  if (!never.empty())
    text += concat(" (", wire::name_ranks(never), never.size() == 1 ? " has" : " have", " not connected yet)");
  return text;
}

std::string BootstrapServer::waiting_summary() const {
  if (!current_ || current_->done) return "";
  return concat(name(*current_), ": ", describe_missing(*current_));
}

void BootstrapServer::rank_ended(int rank, const std::string& how) {
  if (rank < 0 || rank >= world_size_) return;
  // The exit status says more than "its connection closed", which usually comes first.
  departed_[rank] = how;
  evaluate();
}

// ---- writing and closing -------------------------------------------------------------------------

void BootstrapServer::send(Client& c, wire::Header h, std::shared_ptr<const std::vector<char>> payload) {
  OutMessage m;
  h.bytes = payload ? payload->size() : 0;
  wire::encode(h, m.header);
  m.payload = std::move(payload);
  c.out.push_back(std::move(m));
  flush(c);  // most replies fit in the socket buffer: no need to wait for the next poll
}

void BootstrapServer::send_text(Client& c, wire::MessageKind kind, uint64_t sequence, int32_t aux,
                                const std::string& text) {
  send(c, {.kind = kind, .rank = c.rank, .aux = aux, .sequence = sequence}, text_payload(text));
}

void BootstrapServer::flush(Client& c) {
  while (!c.out.empty()) {
    OutMessage& m = c.out.front();
    const size_t payload_bytes = m.payload ? m.payload->size() : 0;
    const size_t total = wire::kHeaderBytes + payload_bytes;
    while (m.sent < total) {
      const bool in_header = m.sent < wire::kHeaderBytes;
      const char* data = in_header ? reinterpret_cast<const char*>(m.header) + m.sent
                                   : m.payload->data() + (m.sent - wire::kHeaderBytes);
      const size_t left = in_header ? wire::kHeaderBytes - m.sent : total - m.sent;
      const ssize_t n = ::send(c.fd, data, left, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        m.sent += static_cast<size_t>(n);
      } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        return;  // poll will say when there is room
      } else if (errno != EINTR) {
        return disconnect(c, concat("exited (its bootstrap connection failed: ", std::strerror(errno), ")"));
      }
    }
    c.out.erase(c.out.begin());
  }
  if (c.close_after_flush) disconnect(c, c.close_reason);
}

void BootstrapServer::disconnect(Client& c, const std::string& why) {
  if (c.closed) return;
  ::close(c.fd);
  c.closed = true;
  c.out.clear();
  if (c.rank < 0) return;  // a refused or not yet introduced connection
  fd_of_rank_[c.rank] = -1;
  if (!departed_.count(c.rank)) departed_[c.rank] = why;
  evaluate();
}

// Answers with an error and hangs up: without a trustworthy stream the rest it sends is dropped.
void BootstrapServer::protocol_error(Client& c, const std::string& text) {
  c.close_after_flush = true;
  c.close_reason = "was disconnected by the bootstrap server after a protocol error: " + text;
  c.header_got = 0;
  c.payload_got = 0;
  c.contributing = false;
  c.payload_buffer.reset();
  send_text(c, wire::MessageKind::kError, c.incoming.sequence, static_cast<int32_t>(ErrorCode::kInternal),
            "bootstrap protocol error: " + text);
}

}  // namespace epcomm::launch
