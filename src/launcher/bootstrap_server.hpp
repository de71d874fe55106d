// The bootstrap server: the other end of bootstrap_from_env (protocol in bootstrap/wire.hpp).
//
// It never blocks and owns no thread: the caller's poll loop (launcher.cpp) asks it for the
// descriptors to watch and hands back what poll() reported. That keeps it safe to run inside a
// process that forks (the gtest harness) and lets one loop also watch the ranks' output and exits.
//
// It gathers each collective's contributions, answers every rank with the concatenation, and fails
// a collective for everyone as soon as a rank it still waits for is known to be gone (its
// connection closed or the launcher saw it exit): no rank waits for a dead peer until its timeout.
//
// It serves local ranks over a unix socket (epcomm-run, the test harness) and the ranks of several
// hosts over TCP (rank 0 of a tcp bootstrap runs it in a thread, src/bootstrap/tcp_bootstrap.cpp).
// A hello must carry the job's secret when one is set; sizes are capped before anything is
// allocated (wire::size_refusal). A connection that has not completed its hello within the hello
// deadline is closed, at most 4 per rank may be waiting to (the oldest goes first), and running out
// of descriptors pauses accepting instead of spinning: a network peer cannot exhaust the server.
#pragma once

#include <poll.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "bootstrap/wire.hpp"
#include "epcomm/error.hpp"

namespace epcomm::launch {

class BootstrapServer {
 public:
  // Listens on a new unix socket at `socket_path` (which must not exist yet; a path that starts
  // with '@' names an abstract socket, which leaves no file behind) for `world_size` ranks. With a
  // non-empty `secret`, only clients whose hello carries it are accepted. Throws
  // std::runtime_error when the socket cannot be created.
  BootstrapServer(int world_size, std::string socket_path, std::string secret = "");
  // Listens on TCP `port` of every local address (0: a free port, see port()).
  static std::unique_ptr<BootstrapServer> listen_tcp(int world_size, int port, std::string secret);
  ~BootstrapServer();
  BootstrapServer(const BootstrapServer&) = delete;
  BootstrapServer& operator=(const BootstrapServer&) = delete;

  // How long a new connection has to complete its hello: kDefaultHelloDeadline, or `limit` when
  // shorter (a rank's bootstrap timeout: a rank that slow has failed anyway).
  static constexpr std::chrono::milliseconds kDefaultHelloDeadline{5000};
  void limit_hello_deadline(std::chrono::milliseconds limit);

  // The value for EPCOMM_BOOTSTRAP: "unix:<socket path>" (unix sockets only).
  const std::string& address() const { return address_; }
  // The TCP port listened on (0 for a unix socket).
  int port() const { return port_; }
  // True while a reply is still queued for some client (a serving rank drains before it stops).
  bool sending() const;

  // One turn of the caller's poll loop: append our descriptors, poll, then pass the whole array
  // back (entries that are not ours are skipped). Call handle() after every poll, also one that
  // timed out: it closes the connections whose hello deadline has passed.
  void add_poll_fds(std::vector<pollfd>& fds) const;
  void handle(std::span<const pollfd> fds);

  // The launcher saw `rank` end; `how` reads like "exited with code 1". Fails any collective that
  // still waits for it.
  void rank_ended(int rank, const std::string& how);

  // For timeout reports: "barrier #3: waiting for ranks 1, 3 (rank 3 never connected)", or "" when
  // no collective is in progress.
  std::string waiting_summary() const;

  // For a forked child: close our descriptors without touching the socket file.
  void close_fds_in_child() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct OutMessage {
    unsigned char header[wire::kHeaderBytes];
    std::shared_ptr<const std::vector<char>> payload;  // shared by every rank receiving a result
    size_t sent = 0;                                   // bytes of header + payload already written
  };
  struct Client {
    int fd = -1;
    int rank = -1;  // -1 until its hello was accepted
    Clock::time_point accepted_at;
    unsigned char header[wire::kHeaderBytes];
    size_t header_got = 0;
    wire::Header incoming;
    // Where the payload of the message being read goes: into `payload_buffer` at `payload_offset`
    // (a contribution), or dropped when the buffer is null. The buffer is shared with the collective
    // so that it outlives a collective that fails while the payload is still arriving.
    std::shared_ptr<std::vector<char>> payload_buffer;
    size_t payload_offset = 0;
    uint64_t payload_got = 0;
    bool contributing = false;       // the message being read is an accepted contribution
    std::vector<OutMessage> out;     // in order; front first
    bool close_after_flush = false;  // refused or misbehaving: input is dropped, closed once answered
    std::string close_reason;
    bool closed = false;
  };
  struct Collective {
    uint64_t sequence = 0;
    wire::CollectiveOp op = wire::CollectiveOp::kAllGather;
    uint64_t bytes = 0;                         // the first contribution's size; the one expected
    std::shared_ptr<std::vector<char>> result;  // world * bytes
    std::vector<uint64_t> sizes;                // per rank, once arrived
    std::vector<bool> arrived;
    bool done = false;
    ErrorCode failure_code = ErrorCode::kInternal;
    std::string failure;  // empty when it succeeded (or is not done)
  };

  BootstrapServer(int world_size, int listen_fd, int port, std::string secret);
  void accept_clients();
  void admit(int fd);
  int unintroduced_clients() const;
  void close_oldest_unintroduced(const char* why);
  void close_late_hellos(Clock::time_point now);
  void read_from(Client& c);
  void on_header(Client& c);
  void on_message(Client& c);
  void on_hello(Client& c);
  void on_collective_header(Client& c);
  void on_query(Client& c);
  Collective* collective_for(Client& c, uint64_t sequence);
  bool refuse_size(Client& c, Collective& col);
  void contribution_done(Client& c);
  void evaluate();
  void fail(Collective& col, ErrorCode code, const std::string& text);
  void flush(Client& c);
  void disconnect(Client& c, const std::string& why);
  void send(Client& c, wire::Header h, std::shared_ptr<const std::vector<char>> payload);
  void send_text(Client& c, wire::MessageKind kind, uint64_t sequence, int32_t aux, const std::string& text);
  void protocol_error(Client& c, const std::string& text);
  std::vector<int> missing_ranks(const Collective& col) const;
  std::string describe_missing(const Collective& col) const;
  std::string name(const Collective& col) const;
  std::string departure_text(const std::vector<int>& ranks) const;

  int world_size_;
  std::string address_;
  std::string path_;  // the socket file to remove at the end; empty for TCP and abstract sockets
  std::string secret_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::map<int, Client> clients_;  // by descriptor
  std::vector<int> fd_of_rank_;    // -1 while the rank has no connection
  std::vector<bool> ever_connected_;
  std::map<int, std::string> departed_;  // rank -> how it ended
  std::optional<Collective> current_;    // the collective in progress, or the last one
  std::vector<char> discard_;            // where dropped payloads are read to
  std::chrono::milliseconds hello_deadline_ = kDefaultHelloDeadline;
  Clock::time_point listener_paused_until_;  // not polled before then (out of descriptors)
};

}  // namespace epcomm::launch
