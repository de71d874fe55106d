// The bootstrap (bootstrap_from_env over the launcher's server, and single_rank_bootstrap):
// all_gather and barrier results, and that every failure surfaces as the right epcomm::Error
// quickly instead of a hang.
#include <dirent.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bootstrap/wire.hpp"
#include "epcomm/bootstrap.hpp"
#include "epcomm/error.hpp"
#include "launcher/launcher.hpp"
#include "support/multirank.hpp"

namespace epcomm {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using testing::run_ranks;
using testing::run_ranks_unchecked;
using testing::RunRanksOptions;

uint64_t fresh_seed() { return std::random_device{}() * 0x100000001ull + std::random_device{}(); }

// Byte `i` of rank `rank`'s contribution in round `round`: a hash of all four, so that a byte in the
// wrong place (other rank, other offset, stale round) is detected.
uint8_t pattern(uint64_t seed, int round, int rank, size_t i) {
  uint64_t x = seed ^ (uint64_t(round) << 48) ^ (uint64_t(rank) << 40) ^ i;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return static_cast<uint8_t>(x);
}

constexpr uint8_t kPoison = 0xA5;

// Gathers `bytes` from every rank and checks every byte; returns false (after one gtest failure
// naming the first wrong byte) when the result is wrong.
void check_all_gather(Bootstrap& group, uint64_t seed, int round, size_t bytes) {
  std::vector<uint8_t> send(bytes), recv(bytes * group.size() + 16, kPoison);
  for (size_t i = 0; i < bytes; ++i) send[i] = pattern(seed, round, group.rank(), i);
  group.all_gather(send.data(), recv.data(), bytes);
  for (int r = 0; r < group.size(); ++r) {
    for (size_t i = 0; i < bytes; ++i) {
      const uint8_t got = recv[r * bytes + i], want = pattern(seed, round, r, i);
      if (got != want) {
        ADD_FAILURE() << "round " << round << " (" << bytes << " bytes): rank " << group.rank() << " got byte " << i
                      << " of rank " << r << "'s contribution = " << int(got) << ", expected " << int(want);
        return;
      }
    }
  }
  for (size_t i = bytes * group.size(); i < recv.size(); ++i)
    ASSERT_EQ(recv[i], kPoison) << "all_gather wrote past size() * bytes at offset " << i;
}

int64_t ms_since(Clock::time_point start) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
}

// ---- a raw client of the launcher's server (what a stray or hostile process could send) ----------

// Connects to the server named by EPCOMM_BOOTSTRAP (abstract or path); -1 on failure.
int connect_to_launcher() {
  const std::string path = std::string(std::getenv("EPCOMM_BOOTSTRAP")).substr(5);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  socklen_t length = sizeof(addr);
  if (path.starts_with('@')) {
    addr.sun_path[0] = '\0';
    length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());
  }
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), length) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool send_header(int fd, const wire::Header& h) {
  unsigned char raw[wire::kHeaderBytes];
  wire::encode(h, raw);
  return ::send(fd, raw, sizeof(raw), MSG_NOSIGNAL) == ssize_t(sizeof(raw));
}

// Reads one reply (header and text payload); false when the connection closed first.
bool read_reply(int fd, wire::Header& h, std::string& text) {
  unsigned char raw[wire::kHeaderBytes];
  if (::recv(fd, raw, sizeof(raw), MSG_WAITALL) != ssize_t(sizeof(raw))) return false;
  h = wire::decode(raw);
  text.assign(h.bytes, '\0');
  return h.bytes == 0 || ::recv(fd, text.data(), h.bytes, MSG_WAITALL) == ssize_t(h.bytes);
}

// ---- single rank ---------------------------------------------------------------------------------

TEST(SingleRankBootstrap, IsRankZeroOfOneAndCopiesItsContribution) {
  auto group = single_rank_bootstrap();
  EXPECT_EQ(group->rank(), 0);
  EXPECT_EQ(group->size(), 1);
  const uint64_t seed = fresh_seed();
  check_all_gather(*group, seed, 0, 1000);
  check_all_gather(*group, seed, 1, 0);
  std::vector<uint8_t> in_place(64);
  for (size_t i = 0; i < in_place.size(); ++i) in_place[i] = pattern(seed, 2, 0, i);
  const std::vector<uint8_t> expected = in_place;
  group->all_gather(in_place.data(), in_place.data(), in_place.size());
  EXPECT_EQ(in_place, expected);
  group->barrier();
}

// ---- all_gather and barrier over the launcher ----------------------------------------------------

class AllGather : public ::testing::TestWithParam<int> {};

TEST_P(AllGather, EveryRankReceivesEveryContributionInRankOrder) {
  const int num_ranks = GetParam();
  const uint64_t seed = fresh_seed();
  run_ranks(num_ranks, [&](Bootstrap& group) {
    ASSERT_EQ(group.size(), num_ranks);
    const size_t sizes[] = {8, 0, 1, 13, 4096, 65537, 3 << 20, 4};
    int round = 0;
    for (size_t bytes : sizes) check_all_gather(group, seed, round++, bytes);
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, AllGather, ::testing::Values(1, 2, 3, 4, 5, 8),
                         [](const auto& info) { return std::to_string(info.param) + "ranks"; });

TEST(AllGather, TensOfMegabytesPerRank) {
  const uint64_t seed = fresh_seed();
  run_ranks(4, [&](Bootstrap& group) { check_all_gather(group, seed, 0, (24 << 20) + 3); });
}

TEST(AllGather, ManySmallRoundsWithRandomSizes) {
  const uint64_t seed = fresh_seed();
  run_ranks(8, [&](Bootstrap& group) {
    std::mt19937_64 sizes(seed);  // the same sequence of sizes on every rank
    for (int round = 0; round < 200; ++round) check_all_gather(group, seed, round, sizes() % 300);
  });
}

TEST(Barrier, NoRankLeavesBeforeTheLastOneArrives) {
  run_ranks(4, [](Bootstrap& group) {
    const auto start = Clock::now();
    if (group.rank() == 2) std::this_thread::sleep_for(milliseconds(400));
    group.barrier();
    EXPECT_GE(ms_since(start), 350) << "rank " << group.rank() << " left the barrier before rank 2 arrived";
    for (int i = 0; i < 100; ++i) group.barrier();
  });
}

// ---- failures --------------------------------------------------------------------------------------

// Lets a rank that stays out of the bootstrap wait until the others are done with it, instead of
// sleeping for a guessed time (the ranks are processes; files are the simplest state they share).
// Made in the parent; its destructor runs there only (the ranks leave with _exit).
class FileLatch {
 public:
  FileLatch() {
    std::string pattern = "/tmp/epcomm-latch-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = pattern;
  }
  ~FileLatch() {
    for (int r = 0; r < 64; ++r) ::unlink(file(r).c_str());
    ::rmdir(dir_.c_str());
  }
  void arrive(int rank) const { std::fclose(std::fopen(file(rank).c_str(), "w")); }
  // True once `count` ranks arrived; false after `timeout`.
  bool wait(int count, milliseconds timeout) const {
    const auto end = Clock::now() + timeout;
    while (Clock::now() < end) {
      int arrived = 0;
      for (int r = 0; r < 64; ++r) arrived += ::access(file(r).c_str(), F_OK) == 0 ? 1 : 0;
      if (arrived >= count) return true;
      std::this_thread::sleep_for(milliseconds(10));
    }
    return false;
  }

 private:
  std::string file(int rank) const { return dir_ + "/" + std::to_string(rank); }
  std::string dir_;
};

TEST(BootstrapFailure, ARankThatNeverJoinsIsNamedInTheTimeout) {
  RunRanksOptions options;
  options.bootstrap_timeout = milliseconds(500);
  const FileLatch others_done;
  run_ranks(
      3,
      [&](Bootstrap& group) {
        if (group.rank() == 1) {  // connected, but never enters the barrier; alive until the others gave up
          EXPECT_TRUE(others_done.wait(2, std::chrono::seconds(60)));
          return;
        }
        const auto start = Clock::now();
        try {
          group.barrier();
          ADD_FAILURE() << "the barrier completed without rank 1";
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
          EXPECT_NE(std::string(e.what()).find("barrier #0"), std::string::npos) << e.what();
          EXPECT_NE(std::string(e.what()).find("waiting for rank 1"), std::string::npos) << e.what();
        }
        const int64_t waited = ms_since(start);
        EXPECT_GE(waited, 450);
        EXPECT_LT(waited, 4000) << "the timeout is not bounded";
        // After a timeout the bootstrap refuses further collectives at once.
        EXPECT_THROW(group.barrier(), Error);
        others_done.arrive(group.rank());
      },
      options);
}

TEST(BootstrapFailure, ARankThatNeverConnectsIsNamedInTheTimeout) {
  launch::LaunchOptions options;
  options.num_ranks = 3;
  options.timeout = std::chrono::seconds(30);
  options.tail_lines = 20;
  const FileLatch others_done;
  const auto run = launch::launch_functions(options, [&](int rank) {
    if (rank == 2) {  // never calls bootstrap_from_env; alive until the others gave up
      return others_done.wait(2, std::chrono::seconds(60)) ? 0 : 22;
    }
    auto group = bootstrap_from_env(milliseconds(400));
    int status = 21;
    try {
      group->all_gather(&rank, nullptr, 0);
    } catch (const Error& e) {
      std::printf("caught: %s\n", e.what());
      const bool named =
          std::string(e.what()).find("waiting for rank 2 (rank 2 has not connected yet)") != std::string::npos;
      status = e.code() == ErrorCode::kTimeout && named ? 0 : 20;
    }
    others_done.arrive(rank);
    return status;
  });
  for (const auto& r : run.ranks) EXPECT_TRUE(r.ok()) << r.how() << "\n" << testing::format_output(r);
}

// Rank 3 dies (SIGKILL) either before the others reach the barrier or while they wait in it; they
// must get kPeerFailure naming rank 3 well before their (long) timeout.
void expect_peer_failure_after_crash(bool others_wait_first) {
  RunRanksOptions options;
  options.bootstrap_timeout = std::chrono::seconds(30);
  const auto run = run_ranks_unchecked(
      4,
      [&](Bootstrap& group) {
        group.barrier();
        if (group.rank() == 3) {
          if (others_wait_first) std::this_thread::sleep_for(milliseconds(300));
          std::raise(SIGKILL);
        }
        if (!others_wait_first) std::this_thread::sleep_for(milliseconds(300));
        const auto start = Clock::now();
        try {
          group.barrier();
          ADD_FAILURE() << "the barrier completed without rank 3";
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), ErrorCode::kPeerFailure) << e.what();
          EXPECT_NE(std::string(e.what()).find("rank 3 exited"), std::string::npos) << e.what();
          std::printf("rank %d: %s\n", group.rank(), e.what());
        }
        EXPECT_LT(ms_since(start), 5000) << "the peer failure was noticed late";
        // The group stays broken.
        try {
          std::this_thread::sleep_for(milliseconds(100));
          group.barrier();
          ADD_FAILURE() << "a barrier completed after rank 3 died";
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), ErrorCode::kPeerFailure) << e.what();
        }
      },
      options);
  ASSERT_EQ(run.ranks.size(), 4u);
  EXPECT_TRUE(run.ranks[3].signaled && run.ranks[3].signal == SIGKILL) << run.ranks[3].how();
  EXPECT_EQ(run.first_failure, 3);
  EXPECT_FALSE(run.timed_out);
  for (int r = 0; r < 3; ++r)
    EXPECT_TRUE(run.ranks[r].ok()) << "rank " << r << " " << run.ranks[r].how() << "\n"
                                   << testing::format_output(run.ranks[r]);
}

TEST(BootstrapFailure, ACrashWhileOthersWaitGivesPeerFailure) { expect_peer_failure_after_crash(true); }
TEST(BootstrapFailure, ACrashBeforeOthersArriveGivesPeerFailure) { expect_peer_failure_after_crash(false); }

TEST(BootstrapFailure, ARankThatLeftNormallyCannotBeWaitedFor) {
  // Rank 1 makes one collective fewer than the others and exits with 0.
  run_ranks(3, [](Bootstrap& group) {
    group.barrier();
    if (group.rank() == 1) return;
    try {
      group.barrier();
      ADD_FAILURE() << "the barrier completed without rank 1";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kPeerFailure) << e.what();
      EXPECT_NE(std::string(e.what()).find("rank 1 exited"), std::string::npos) << e.what();
    }
  });
}

TEST(BootstrapFailure, AStrangerWritingGarbageToTheSocketDoesNotDisturbTheGroup) {
  const uint64_t seed = fresh_seed();
  run_ranks(2, [&](Bootstrap& group) {
    if (group.rank() == 0) {
      const int fd = connect_to_launcher();
      ASSERT_GE(fd, 0);
      std::vector<char> garbage(100);
      for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<char>(pattern(seed, 0, 9, i));
      ASSERT_EQ(::write(fd, garbage.data(), garbage.size()), ssize_t(garbage.size()));
      char reply[256];
      EXPECT_GT(::read(fd, reply, sizeof(reply)), 0) << "the server did not answer the bad message";
      ::close(fd);
    }
    check_all_gather(group, seed, 1, 333);
  });
}

// Who is missing is the group's business: a connection that has not said hello (a stranger) is
// refused a status query instead of being told which ranks the group waits for.
TEST(BootstrapFailure, AQueryBeforeTheHelloIsRefused) {
  run_ranks(2, [&](Bootstrap& group) {
    if (group.rank() == 0) {
      const int fd = connect_to_launcher();
      ASSERT_GE(fd, 0);
      ASSERT_TRUE(send_header(fd, {.kind = wire::MessageKind::kQuery, .rank = 1, .sequence = 0}));
      wire::Header reply;
      std::string text;
      ASSERT_TRUE(read_reply(fd, reply, text)) << "the server did not answer the query";
      EXPECT_EQ(reply.kind, wire::MessageKind::kError) << text;
      EXPECT_NE(text.find("a query before the hello"), std::string::npos) << text;
      ::close(fd);
    }
    group.barrier();
  });
}

TEST(BootstrapFailure, DifferentSizesFailEveryRankAndNameThem) {
  run_ranks(4, [](Bootstrap& group) {
    const size_t bytes = group.rank() == 1 ? 16 : 8;
    std::vector<char> send(bytes, 'x'), recv(16 * group.size());
    try {
      group.all_gather(send.data(), recv.data(), bytes);
      ADD_FAILURE() << "all_gather accepted different sizes";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
      const std::string text = e.what();
      EXPECT_NE(text.find("8 bytes from ranks 0, 2, 3"), std::string::npos) << text;
      EXPECT_NE(text.find("16 bytes from rank 1"), std::string::npos) << text;
    }
    // A usage error leaves the group usable.
    check_all_gather(group, 42, 7, 100);
  });
}

// ---- bootstrap_from_env arguments ------------------------------------------------------------------

// Sets environment variables for one test and restores them after.
class ScopedEnv {
 public:
  void set(const char* name, const char* value) {
    const char* old = std::getenv(name);
    saved_.push_back({name, old ? std::optional<std::string>(old) : std::nullopt});
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second)
        ::setenv(it->first.c_str(), it->second->c_str(), 1);
      else
        ::unsetenv(it->first.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

void expect_error(ErrorCode code, const std::string& fragment, milliseconds timeout = milliseconds(300)) {
  try {
    bootstrap_from_env(timeout);
    ADD_FAILURE() << "bootstrap_from_env succeeded; expected an error containing '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(BootstrapFromEnv, MissingOrBadVariablesAreNamed) {
  ScopedEnv env;
  env.set("EPCOMM_WORLD_SIZE", nullptr);
  env.set("EPCOMM_RANK", nullptr);
  env.set("EPCOMM_BOOTSTRAP", nullptr);
  expect_error(ErrorCode::kInvalidArgument, "EPCOMM_WORLD_SIZE: not set");
  env.set("EPCOMM_WORLD_SIZE", "4");
  expect_error(ErrorCode::kInvalidArgument, "EPCOMM_RANK: not set");
  env.set("EPCOMM_RANK", "4");
  expect_error(ErrorCode::kInvalidArgument, "EPCOMM_RANK: expected an integer in [0, 3], got '4'");
  env.set("EPCOMM_RANK", "1x");
  expect_error(ErrorCode::kInvalidArgument, "got '1x'");
  env.set("EPCOMM_RANK", "1");
  expect_error(ErrorCode::kInvalidArgument, "EPCOMM_BOOTSTRAP: not set");
  env.set("EPCOMM_BOOTSTRAP", "/tmp/x.sock");
  expect_error(ErrorCode::kInvalidArgument, "expected 'unix:<socket path>' or 'tcp:<host>:<port>', got '/tmp/x.sock'");
  env.set("EPCOMM_BOOTSTRAP", "tcp:node0");
  expect_error(ErrorCode::kInvalidArgument, "got 'tcp:node0'");
  env.set("EPCOMM_BOOTSTRAP", "tcp:node0:70000");
  expect_error(ErrorCode::kInvalidArgument, "got 'tcp:node0:70000'");
}

TEST(BootstrapFromEnv, NoServerIsATimeoutNamingTheSocket) {
  ScopedEnv env;
  env.set("EPCOMM_WORLD_SIZE", "2");
  env.set("EPCOMM_RANK", "0");
  env.set("EPCOMM_BOOTSTRAP", "unix:/tmp/epcomm-no-such-dir/bootstrap.sock");
  const auto start = Clock::now();
  expect_error(ErrorCode::kTimeout,
               "could not connect to the bootstrap server at '/tmp/epcomm-no-such-dir/bootstrap.sock'");
  EXPECT_LT(ms_since(start), 2000);
}

TEST(BootstrapFromEnv, ARankConnectingTwiceIsRefused) {
  run_ranks(2, [](Bootstrap& group) {
    if (group.rank() == 0) {
      try {
        bootstrap_from_env(milliseconds(2000));  // same EPCOMM_RANK as `group`
        ADD_FAILURE() << "a second connection as rank 0 was accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
        EXPECT_NE(std::string(e.what()).find("rank 0 is already connected"), std::string::npos) << e.what();
      }
    }
    group.barrier();  // the refused connection does not disturb the group
  });
}

// Descriptors open in this process (the entries of /proc/self/fd, less the one listing them).
int open_descriptors() {
  int count = 0;
  DIR* directory = ::opendir("/proc/self/fd");
  if (directory == nullptr) return -1;
  while (const dirent* entry = ::readdir(directory))
    if (entry->d_name[0] != '.') ++count;
  ::closedir(directory);
  return count - 1;
}

// A hello the server refuses throws from SocketBootstrap's constructor: the socket it connected must
// be closed all the same (a program that retries must not run out of descriptors).
TEST(BootstrapFromEnv, ARefusedHelloLeavesNoDescriptorOpen) {
  run_ranks(2, [](Bootstrap& group) {
    if (group.rank() == 0) {
      const int before = open_descriptors();
      for (int attempt = 0; attempt < 5; ++attempt) {
        try {
          bootstrap_from_env(milliseconds(2000));  // same EPCOMM_RANK as `group`: refused
          ADD_FAILURE() << "a second connection as rank 0 was accepted";
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
        }
      }
      EXPECT_EQ(open_descriptors(), before) << "descriptors leaked by refused hellos";
    }
    group.barrier();
  });
}

// ---- the launcher's secret and size caps (issue 11, item 6) -------------------------------------------

// Rank 1 tries to join with no secret and with a wrong one (a stray process with a stale or
// foreign environment): both refused by name, and neither takes its slot; then it joins for real.
TEST(BootstrapSecret, AHelloWithoutTheJobsSecretIsRefused) {
  launch::LaunchOptions options;
  options.num_ranks = 2;
  options.timeout = std::chrono::seconds(60);
  const auto run = launch::launch_functions(options, [](int rank) {
    const std::string secret = std::getenv("EPCOMM_BOOTSTRAP_SECRET");
    if (secret.size() < 32) return 30;  // the launcher hands out a long random secret
    if (rank == 1) {
      for (const char* wrong : {"", "not-the-secret"}) {
        ::setenv("EPCOMM_BOOTSTRAP_SECRET", wrong, 1);
        try {
          bootstrap_from_env(milliseconds(5000));
          std::printf("joined with secret '%s'\n", wrong);
          return 31;
        } catch (const Error& e) {
          std::printf("refused: %s\n", e.what());
          const bool named = std::string(e.what()).find(*wrong ? "a wrong bootstrap secret (rank 1)"
                                                               : "no bootstrap secret (rank 1)") != std::string::npos;
          if (e.code() != ErrorCode::kInvalidArgument || !named) return 32;
        }
      }
      ::setenv("EPCOMM_BOOTSTRAP_SECRET", secret.c_str(), 1);
    }
    auto group = bootstrap_from_env(milliseconds(20000));
    group->barrier();
    return 0;
  });
  for (const auto& r : run.ranks) EXPECT_TRUE(r.ok()) << r.how() << "\n" << testing::format_output(r);
}

// A message announcing 4 GiB must not make the server allocate world x 4 GiB: the collective is
// refused for every rank, naming the sender and the size, at once.
TEST(BootstrapLimits, AnAnnouncedHugeContributionIsRefusedWithoutAllocating) {
  for (const bool huge_first : {true, false}) {
    launch::LaunchOptions options;
    options.num_ranks = 3;
    options.timeout = std::chrono::seconds(60);
    const FileLatch rank0_waiting;
    const auto run = launch::launch_functions(options, [&](int rank) {
      if (rank == 2) {  // speaks the protocol by hand
        if (!huge_first && !rank0_waiting.wait(2, std::chrono::seconds(30))) return 40;
        const int fd = connect_to_launcher();
        const std::string secret = std::getenv("EPCOMM_BOOTSTRAP_SECRET");
        if (fd < 0 ||
            !send_header(fd, {.kind = wire::MessageKind::kHello, .rank = 2, .aux = 3, .bytes = secret.size()}) ||
            ::send(fd, secret.data(), secret.size(), MSG_NOSIGNAL) != ssize_t(secret.size()))
          return 41;
        wire::Header reply;
        std::string text;
        if (!read_reply(fd, reply, text) || reply.kind != wire::MessageKind::kWelcome) return 42;
        if (!send_header(
                fd, {.kind = wire::MessageKind::kCollective, .rank = 2, .sequence = 0, .bytes = uint64_t{4} << 30}))
          return 43;
        const auto start = Clock::now();
        if (!read_reply(fd, reply, text)) return 44;
        std::printf("rank 2 heard: %s (after %lld ms)\n", text.c_str(), static_cast<long long>(ms_since(start)));
        ::close(fd);
        return reply.kind == wire::MessageKind::kError && text.find("refused") != std::string::npos ? 0 : 45;
      }
      auto group = bootstrap_from_env(milliseconds(30000));
      std::vector<char> send(8, 'x'), recv(8 * 3);
      const auto start = Clock::now();
      try {
        if (!huge_first) rank0_waiting.arrive(rank);  // just before: the 4 GiB arrives mid-collective
        group->all_gather(send.data(), recv.data(), 8);
        return 46;
      } catch (const Error& e) {
        std::printf("rank %d: %s (after %lld ms)\n", rank, e.what(), static_cast<long long>(ms_since(start)));
        const bool named = std::string(e.what()).find("rank 2 announced all_gather #0 of 4294967296 bytes per rank") !=
                           std::string::npos;
        return e.code() == ErrorCode::kInvalidArgument && named && ms_since(start) < 10000 ? 0 : 47;
      }
    });
    for (const auto& r : run.ranks)
      EXPECT_TRUE(r.ok()) << (huge_first ? "huge first: " : "huge second: ") << r.how() << "\n"
                          << testing::format_output(r);
  }
}

TEST(BootstrapLimits, TheClientRefusesAnOversizedContributionBeforeSendingIt) {
  run_ranks(2, [](Bootstrap& group) {
    try {
      group.all_gather(nullptr, nullptr, size_t(wire::kMaxContributionBytes) + 1);
      ADD_FAILURE() << "an oversized all_gather was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find("bytes per rank is more than the bootstrap accepts"), std::string::npos)
          << e.what();
    }
    check_all_gather(group, 99, 0, 64);  // nothing was sent: the group goes on
  });
}

// ---- the TCP bootstrap (torchrun's variables) on loopback ----------------------------------------------

// A TCP port that was free a moment ago (the kernel's pick), for MASTER_PORT + 1.
int free_tcp_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t length = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) != 0)
    throw std::runtime_error("no free TCP port");
  ::close(fd);
  return ntohs(addr.sin_port);
}

// Runs `body(rank)` on `num_ranks` processes with torchrun's variables set; the body's return is
// the rank's exit status.
launch::LaunchResult run_with_torchrun_env(int num_ranks, const std::function<int(int)>& body) {
  launch::LaunchOptions options;
  options.num_ranks = num_ranks;
  options.timeout = std::chrono::seconds(90);
  const int port = free_tcp_port();
  const std::string secret = "tcp-test-" + std::to_string(fresh_seed());
  return launch::launch_functions(options, [&](int rank) {
    ::setenv("MASTER_ADDR", "127.0.0.1", 1);
    ::setenv("MASTER_PORT", std::to_string(port - 1).c_str(), 1);
    ::setenv("RANK", std::to_string(rank).c_str(), 1);
    ::setenv("WORLD_SIZE", std::to_string(num_ranks).c_str(), 1);
    ::setenv("LOCAL_WORLD_SIZE", std::to_string(num_ranks).c_str(), 1);
    ::setenv("EPCOMM_BOOTSTRAP_SECRET", secret.c_str(), 1);
    return body(rank);
  });
}

TEST(TcpBootstrap, FourRanksOnLoopbackGatherEveryByteAndAStrangerIsKeptOut) {
  const uint64_t seed = fresh_seed();
  const auto run = run_with_torchrun_env(4, [&](int rank) {
    if (rank == 3) {  // first as a process of another job: refused, and its slot stays free
      const std::string secret = std::getenv("EPCOMM_BOOTSTRAP_SECRET");
      ::setenv("EPCOMM_BOOTSTRAP_SECRET", "another-job", 1);
      try {
        tcp_bootstrap_from_env(milliseconds(20000));
        return 50;
      } catch (const Error& e) {
        std::printf("stranger refused: %s\n", e.what());
        if (std::string(e.what()).find("a wrong bootstrap secret (rank 3)") == std::string::npos) return 51;
      }
      ::setenv("EPCOMM_BOOTSTRAP_SECRET", secret.c_str(), 1);
    }
    auto group = tcp_bootstrap_from_env(milliseconds(20000));
    if (group->rank() != rank || group->size() != 4) return 52;
    const size_t sizes[] = {8, 0, 1, 4096, 65537, 3 << 20, 13};
    int round = 0;
    for (size_t bytes : sizes) check_all_gather(*group, seed, round++, bytes);
    for (int i = 0; i < 50; ++i) group->barrier();
    return ::testing::Test::HasFailure() ? 53 : 0;
  });
  for (const auto& r : run.ranks) EXPECT_TRUE(r.ok()) << r.how() << "\n" << testing::format_output(r);
}

TEST(TcpBootstrap, ARankThatLeavesFailsThePeersWaitingForItAtOnce) {
  const auto run = run_with_torchrun_env(3, [&](int rank) {
    auto group = tcp_bootstrap_from_env(std::chrono::seconds(60));
    group->barrier();
    if (rank == 2) return 0;  // leaves: its connection closes
    const auto start = Clock::now();
    int status = 0;
    try {
      group->barrier();
      status = 60;
    } catch (const Error& e) {
      std::printf("rank %d: %s\n", rank, e.what());
      const bool named = std::string(e.what()).find("rank 2 exited") != std::string::npos;
      status = e.code() == ErrorCode::kPeerFailure && named && ms_since(start) < 10000 ? 0 : 61;
    }
    // Rank 0 serves: it stays until rank 1 has heard (had it gone, rank 1 would hear that instead).
    if (rank == 0) std::this_thread::sleep_for(milliseconds(1000));
    return status;
  });
  for (const auto& r : run.ranks) EXPECT_TRUE(r.ok()) << r.how() << "\n" << testing::format_output(r);
}

TEST(TcpBootstrap, EpcommBootstrapMayNameATcpAddressServedByRankZero) {
  const uint64_t seed = fresh_seed();
  const int port = free_tcp_port();
  launch::LaunchOptions options;
  options.num_ranks = 3;
  options.timeout = std::chrono::seconds(60);
  const auto run = launch::launch_functions(options, [&](int) {
    ::setenv("EPCOMM_BOOTSTRAP", ("tcp:127.0.0.1:" + std::to_string(port)).c_str(), 1);
    ::unsetenv("EPCOMM_BOOTSTRAP_SECRET");  // then a token derived from the job, alike on every rank
    auto group = bootstrap_from_env(milliseconds(20000));
    check_all_gather(*group, seed, 0, 1000);
    group->barrier();
    return ::testing::Test::HasFailure() ? 1 : 0;
  });
  for (const auto& r : run.ranks) EXPECT_TRUE(r.ok()) << r.how() << "\n" << testing::format_output(r);
}

// CPU time this process has used, all threads.
double cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec + 1e-6 * (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

// Rank 0 leaving while a result is still queued for a rank that does not read it: its server
// thread drains for a bounded time, and waits in poll() meanwhile instead of spinning (the stop
// request stayed readable, so every poll returned at once and the drain took a core).
TEST(TcpBootstrap, RankZeroDrainingForASlowReaderDoesNotSpin) {
  const int port = free_tcp_port();
  const std::string secret = "drain-test";
  auto rank0 = tcp_bootstrap(0, 2, "127.0.0.1", port, secret, milliseconds(20000));
  constexpr size_t kBytes = size_t{32} << 20;  // the 64 MiB result cannot fit in the socket buffers
  std::vector<char> mine(kBytes, 1), all(2 * kBytes);
  std::thread gather([&] { rank0->all_gather(mine.data(), all.data(), kBytes); });

  // Rank 1: a raw client that contributes and then never reads its result.
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << std::strerror(errno);
  ASSERT_TRUE(send_header(fd, {.kind = wire::MessageKind::kHello, .rank = 1, .aux = 2, .bytes = secret.size()}));
  ASSERT_EQ(::send(fd, secret.data(), secret.size(), MSG_NOSIGNAL), ssize_t(secret.size()));
  wire::Header welcome;
  std::string text;
  ASSERT_TRUE(read_reply(fd, welcome, text));
  ASSERT_EQ(welcome.kind, wire::MessageKind::kWelcome) << text;
  ASSERT_TRUE(send_header(fd, {.kind = wire::MessageKind::kCollective, .rank = 1, .sequence = 0, .bytes = kBytes}));
  std::vector<char> theirs(kBytes, 2);
  for (size_t sent = 0; sent < kBytes;) {
    const ssize_t n = ::send(fd, theirs.data() + sent, kBytes - sent, MSG_NOSIGNAL);
    ASSERT_GT(n, 0) << std::strerror(errno);
    sent += static_cast<size_t>(n);
  }
  gather.join();
  EXPECT_EQ(all[kBytes], 2);

  const double cpu_before = cpu_seconds();
  const auto start = Clock::now();
  rank0.reset();  // its server still has most of rank 1's 64 MiB queued
  const int64_t waited = ms_since(start);
  const double cpu_used = cpu_seconds() - cpu_before;
  ::close(fd);
  EXPECT_LT(waited, 5000) << "the drain is bounded";
  EXPECT_LT(cpu_used, 0.5) << "rank 0 spun for " << cpu_used << " s of CPU while draining for " << waited << " ms";
}

// A TCP client socket connected to 127.0.0.1:`port` that sends nothing.
int connect_silently(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return fd;
  if (fd >= 0) ::close(fd);
  return -1;
}

// True when the server closed `fd` within `wait` (a read returns end of file).
bool closed_by_server(int fd, milliseconds wait) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(wait.count())) <= 0) return false;
  char byte;
  return ::recv(fd, &byte, 1, MSG_DONTWAIT) <= 0;
}

// Two real ranks gather through `rank0` (rank 1 joins from a thread) and check every byte.
void expect_two_ranks_gather(std::unique_ptr<Bootstrap>& rank0, int port, const std::string& secret) {
  const uint64_t seed = fresh_seed();
  std::thread rank1([&] {
    auto group = tcp_bootstrap(1, 2, "127.0.0.1", port, secret, milliseconds(20000));
    check_all_gather(*group, seed, 0, 1000);
  });
  check_all_gather(*rank0, seed, 0, 1000);
  rank1.join();
}

// Connections that never say hello are capped (4 per rank, the oldest closed first), so a peer
// opening many of them neither holds rank 0's descriptors nor keeps the real ranks out.
TEST(TcpBootstrap, ManySilentConnectionsAreCappedAndDoNotKeepRanksOut) {
  const int port = free_tcp_port();
  const std::string secret = "silent-test";
  auto rank0 = tcp_bootstrap(0, 2, "127.0.0.1", port, secret, milliseconds(20000));
  constexpr int kSilent = 40, kCap = 4 * 2;
  std::vector<int> silent;
  for (int i = 0; i < kSilent; ++i) {
    silent.push_back(connect_silently(port));
    ASSERT_GE(silent.back(), 0) << std::strerror(errno);
  }
  expect_two_ranks_gather(rank0, port, secret);
  int closed = 0;  // the oldest were closed first: wait for the first one only
  for (size_t i = 0; i < silent.size(); ++i) closed += closed_by_server(silent[i], milliseconds(i == 0 ? 2000 : 20));
  for (int fd : silent) ::close(fd);
  EXPECT_GE(closed, kSilent - kCap) << "the server kept more than " << kCap << " connections without a hello";
}

// A connection without a hello is closed after the hello deadline (here the bootstrap timeout,
// shorter than the default of a few seconds).
TEST(TcpBootstrap, ASilentConnectionIsClosedAfterTheHelloDeadline) {
  const int port = free_tcp_port();
  auto rank0 = tcp_bootstrap(0, 2, "127.0.0.1", port, "deadline-test", milliseconds(1500));
  const int fd = connect_silently(port);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  const auto start = Clock::now();
  const bool closed = closed_by_server(fd, milliseconds(10000));
  const int64_t waited = ms_since(start);
  ::close(fd);
  EXPECT_TRUE(closed) << "a silent connection was still open after " << waited << " ms";
  EXPECT_GE(waited, 1000) << "closed before the deadline";
  EXPECT_LT(waited, 4000) << "closed long after the 1500 ms deadline";
}

// Out of descriptors, accept4 fails with EMFILE while the connection stays queued, so the listener
// stays readable: the server must back off instead of polling it again at once. Once descriptors
// are free again, a real rank still joins.
TEST(TcpBootstrap, AcceptFailingForWantOfDescriptorsDoesNotSpin) {
  const int port = free_tcp_port();
  const std::string secret = "emfile-test";
  auto rank0 = tcp_bootstrap(0, 2, "127.0.0.1", port, secret, milliseconds(20000));
  constexpr int kSilent = 30;
  std::vector<int> silent;
  for (int i = 0; i < kSilent; ++i) silent.push_back(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(silent.back() + 1 + 2);  // the server can accept two more
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &tight), 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  for (int fd : silent) ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));

  const double cpu_before = cpu_seconds();
  std::this_thread::sleep_for(milliseconds(1000));
  const double cpu_used = cpu_seconds() - cpu_before;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  EXPECT_LT(cpu_used, 0.3) << "the server spun for " << cpu_used << " s of CPU in 1 s without descriptors";
  expect_two_ranks_gather(rank0, port, secret);
  for (int fd : silent) ::close(fd);
}

TEST(TcpBootstrap, MissingVariablesAreNamed) {
  ScopedEnv env;
  for (const char* name : {"RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT",
                           "EPCOMM_BOOTSTRAP_PORT", "LOCAL_WORLD_SIZE"})
    env.set(name, nullptr);
  auto expect = [](const std::string& fragment) {
    try {
      tcp_bootstrap_from_env(milliseconds(300));
      ADD_FAILURE() << "tcp_bootstrap_from_env succeeded; expected '" << fragment << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  expect("tcp_bootstrap_from_env: WORLD_SIZE: not set");
  env.set("SLURM_NTASKS", "4");  // the SLURM fallback
  expect("tcp_bootstrap_from_env: RANK: not set");
  env.set("SLURM_PROCID", "5");
  expect("SLURM_PROCID: expected an integer in [0, 3], got '5'");
  env.set("RANK", "1");
  expect("MASTER_ADDR: not set");
  env.set("MASTER_ADDR", "127.0.0.1");
  expect("MASTER_PORT: not set");
  env.set("MASTER_PORT", "65535");
  expect("MASTER_PORT: expected an integer in [1, 65534], got '65535'");
  env.set("LOCAL_WORLD_SIZE", "8");
  expect("LOCAL_WORLD_SIZE: expected an integer in [1, 4], got '8'");
}

}  // namespace
}  // namespace epcomm
