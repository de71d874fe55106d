// The bootstrap wire protocol: how a rank talks to the bootstrap server run by epcomm-run (or by
// the test harness). Shared by the client (env_bootstrap.cpp, part of libepcomm) and the server
// (src/launcher/, part of epcomm_launch); the format half is header-only so that the launcher does
// not depend on libepcomm.
//
// Every message is a fixed 32-byte header followed by `bytes` bytes of payload. All header fields
// are little-endian.
//
//   client -> server                         server -> client
//   kHello     rank, aux = world size,       kWelcome   (hello accepted)
//              payload = the job's secret
//   kCollective rank, aux = CollectiveOp,    kResult    sequence, payload = world * bytes,
//              sequence, payload                        rank r's contribution at r * bytes
//   kQuery     sequence (after a timeout)    kStatus    sequence, payload = who is missing (text)
//                                            kError     sequence, aux = ErrorCode, payload = text
//
// Sequence numbers count each client's collectives from 0; every rank performs the same sequence,
// so the server can only ever have one collective in flight.
//
// The secret: the launcher (epcomm-run) or the serving rank (TCP) knows the job's secret and
// refuses a hello that does not carry it, so a stray process (another job's rank, a process with a
// stale environment, another user on the network) cannot take a rank's place.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace epcomm::wire {

constexpr uint32_t kMagic = 0x32435045;  // "EPC2" read as little-endian bytes; bump on format change
constexpr size_t kHeaderBytes = 32;
// A contribution larger than this, or one whose all_gather result (world * bytes) would be larger
// than kMaxResultBytes, is refused before anything is allocated: a garbled or hostile header must
// not make the server allocate world * 4 GiB. epcomm itself gathers a few hundred bytes per rank.
constexpr uint64_t kMaxContributionBytes = uint64_t{256} << 20;
constexpr uint64_t kMaxResultBytes = uint64_t{4} << 30;
// The longest secret a hello may carry.
constexpr uint64_t kMaxSecretBytes = 256;

// Why a contribution of `bytes` from each of `world` ranks is refused, or "" when it is accepted.
inline std::string size_refusal(uint64_t bytes, int world) {
  if (bytes > kMaxContributionBytes)
    return std::to_string(bytes) + " bytes per rank is more than the bootstrap accepts (" +
           std::to_string(kMaxContributionBytes) + " bytes per rank)";
  if (world > 0 && bytes > kMaxResultBytes / static_cast<uint64_t>(world))
    return std::to_string(bytes) + " bytes per rank from " + std::to_string(world) +
           " ranks is more than the bootstrap accepts in all (" + std::to_string(kMaxResultBytes) + " bytes)";
  return "";
}

// Compares secrets in time independent of where they differ.
inline bool same_secret(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    diff |= static_cast<unsigned char>(a[i]) ^ static_cast<unsigned char>(b[i]);
  return diff == 0;
}

enum class MessageKind : uint32_t {
  kHello = 1,
  kWelcome = 2,
  kCollective = 3,
  kResult = 4,
  kQuery = 5,
  kStatus = 6,
  kError = 7,
};

// Which collective a kCollective message belongs to; only used to name it in messages.
enum class CollectiveOp : int32_t { kAllGather = 0, kBarrier = 1 };

inline const char* to_string(CollectiveOp op) { return op == CollectiveOp::kBarrier ? "barrier" : "all_gather"; }

struct Header {
  uint32_t magic = kMagic;
  MessageKind kind = MessageKind::kHello;
  int32_t rank = -1;
  int32_t aux = 0;  // meaning depends on kind (see the table above)
  uint64_t sequence = 0;
  uint64_t bytes = 0;  // payload length
};

namespace detail {
inline void put_u32(unsigned char* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}
inline void put_u64(unsigned char* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}
inline uint32_t get_u32(const unsigned char* in) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{in[i]} << (8 * i);
  return v;
}
inline uint64_t get_u64(const unsigned char* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{in[i]} << (8 * i);
  return v;
}
}  // namespace detail

inline void encode(const Header& h, unsigned char out[kHeaderBytes]) {
  detail::put_u32(out + 0, h.magic);
  detail::put_u32(out + 4, static_cast<uint32_t>(h.kind));
  detail::put_u32(out + 8, static_cast<uint32_t>(h.rank));
  detail::put_u32(out + 12, static_cast<uint32_t>(h.aux));
  detail::put_u64(out + 16, h.sequence);
  detail::put_u64(out + 24, h.bytes);
}

inline Header decode(const unsigned char in[kHeaderBytes]) {
  Header h;
  h.magic = detail::get_u32(in + 0);
  h.kind = static_cast<MessageKind>(detail::get_u32(in + 4));
  h.rank = static_cast<int32_t>(detail::get_u32(in + 8));
  h.aux = static_cast<int32_t>(detail::get_u32(in + 12));
  h.sequence = detail::get_u64(in + 16);
  h.bytes = detail::get_u64(in + 24);
  return h;
}

// Addresses look like "unix:/path/to/socket" or "unix:@name" (an abstract socket: no file, so
// nothing is left behind when the launcher is killed), and "tcp:host:port" (served by rank 0).
struct Address {
  enum class Transport { kUnix, kTcp } transport = Transport::kUnix;
  std::string location;  // the socket path ('@' first: abstract) for kUnix, "host:port" for kTcp
};

// Splits "host:port" / "[v6 address]:port"; false when malformed.
inline bool split_host_port(std::string_view text, std::string& host, int& port) {
  const size_t colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 >= text.size()) return false;
  std::string_view h = text.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  int value = 0;
  for (char c : text.substr(colon + 1)) {
    if (c < '0' || c > '9' || value > 65535) return false;
    value = value * 10 + (c - '0');
  }
  if (value < 1 || value > 65535 || h.empty()) return false;
  host = std::string(h);
  port = value;
  return true;
}

// Parses an EPCOMM_BOOTSTRAP value; returns false when it is malformed.
inline bool parse_address(std::string_view text, Address& out) {
  if (text.starts_with("unix:") && text.size() > 5) {
    out = Address{Address::Transport::kUnix, std::string(text.substr(5))};
    return true;
  }
  std::string host;
  int port = 0;
  if (text.starts_with("tcp:") && split_host_port(text.substr(4), host, port)) {
    out = Address{Address::Transport::kTcp, std::string(text.substr(4))};
    return true;
  }
  return false;
}

// "3", "0, 2", "1-4, 6": an ascending list of ranks written compactly for messages.
inline std::string format_ranks(const std::vector<int>& ranks) {
  std::string text;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (!text.empty()) text += ", ";
    text += std::to_string(ranks[i]);
    if (j > i) text += (j == i + 1 ? ", " : "-") + std::to_string(ranks[j]);
    i = j + 1;
  }
  return text;
}

// "rank 3" or "ranks 1, 4-6".
inline std::string name_ranks(const std::vector<int>& ranks) {
  return (ranks.size() == 1 ? "rank " : "ranks ") + format_ranks(ranks);
}

// ---- Client-side socket I/O (wire.cpp, part of libepcomm) ----------------------------------------
// The socket must be non-blocking. When `deadline` passes, `on_expire` is called: it returns a new
// deadline to keep going, or throws. A closed connection throws Error(kPeerFailure), a failed
// system call Error(kInternal); `what` names the exchange in those messages.
using Clock = std::chrono::steady_clock;
using ExpiryHandler = std::function<Clock::time_point()>;

void send_all(int fd, const void* data, size_t bytes, Clock::time_point& deadline, const ExpiryHandler& on_expire,
              const std::string& what);
void receive_all(int fd, void* data, size_t bytes, Clock::time_point& deadline, const ExpiryHandler& on_expire,
                 const std::string& what);

}  // namespace epcomm::wire
