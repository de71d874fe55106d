// The CPU backend's shared segments (src/cpu/shared_memory.*): random names that skip taken ones,
// and nothing left in /dev/shm when a rank is killed at any step of a Buffer's construction.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/shared_memory.hpp"
#include "epcomm/epcomm.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

// Names in /dev/shm made by process `pid` (epcomm-<pid>-...).
std::vector<std::string> segments_of(pid_t pid) {
  std::vector<std::string> found;
  const std::string prefix = "epcomm-" + std::to_string(pid) + "-";
  DIR* directory = opendir("/dev/shm");
  if (directory == nullptr) return found;
  while (const dirent* entry = readdir(directory))
    if (std::string(entry->d_name).rfind(prefix, 0) == 0) found.push_back(entry->d_name);
  closedir(directory);
  return found;
}

BufferOptions small_cpu_buffer() {
  BufferOptions options;
  options.backend = BackendKind::kCpu;
  options.num_nvl_bytes = 1 << 16;
  options.timeout = std::chrono::milliseconds(3000);
  return options;
}

TEST(SharedMemory, NamesAreRandomAndCarryThePid) {
  const std::string a = cpu::random_segment_name(3), b = cpu::random_segment_name(3);
  EXPECT_NE(a, b);
  const std::string prefix = "/epcomm-" + std::to_string(getpid()) + "-3-";
  EXPECT_EQ(a.rfind(prefix, 0), 0u) << a;
  EXPECT_EQ(a.size(), prefix.size() + 16) << a;
}

// A name that exists already (planted by another process or user) is skipped, and the planted
// segment is left alone.
TEST(SharedMemory, TakenNameIsSkipped) {
  const std::string planted = cpu::random_segment_name(0);
  const int fd = shm_open(planted.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  close(fd);
  int calls = 0;
  {
    cpu::SharedSegment segment =
        cpu::SharedSegment::create_unique(4096, [&] { return ++calls == 1 ? planted : cpu::random_segment_name(0); });
    EXPECT_EQ(calls, 2);
    EXPECT_NE(segment.name(), planted);
    EXPECT_EQ(segment.data()[100], std::byte{0});
  }
  EXPECT_EQ(segments_of(getpid()).size(), 1u);  // the planted one; ours was unlinked
  shm_unlink(planted.c_str());
  // Only taken names: a named error after a few attempts, not a hang.
  const int fd2 = shm_open(planted.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd2, 0);
  close(fd2);
  EXPECT_THROW(cpu::SharedSegment::create_unique(4096, [&] { return planted; }), Error);
  shm_unlink(planted.c_str());
}

// A peer's segment smaller than the size expected (a peer that sized it otherwise, or a name that is
// not its segment) is refused when it is opened: mapping it whole would "succeed" and the first
// access past its end would kill the process with SIGBUS.
TEST(SharedMemory, OpeningASegmentSmallerThanExpectedIsAnErrorNamingBothSizes) {
  cpu::SharedSegment small = cpu::SharedSegment::create_unique(4096, [] { return cpu::random_segment_name(0); });
  try {
    cpu::SharedSegment opened = cpu::SharedSegment::open(small.name(), 8192);
    ADD_FAILURE() << "a 4096-byte segment was mapped as 8192 bytes";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInternal) << e.what();
    const std::string text = e.what();
    EXPECT_NE(text.find(small.name()), std::string::npos) << text;
    EXPECT_NE(text.find("4096 bytes"), std::string::npos) << text;
    EXPECT_NE(text.find("8192"), std::string::npos) << text;
  }
  cpu::SharedSegment same = cpu::SharedSegment::open(small.name(), 4096);  // the expected size still opens
  EXPECT_EQ(same.size(), 4096u);
}

// Rank 0 of two, whose peer (rank 1) contributes `record` as its segment's name.
class ScriptedPeer final : public Bootstrap {
 public:
  explicit ScriptedPeer(std::string record) : record_(std::move(record)) {}
  int rank() const override { return 0; }
  int size() const override { return 2; }
  void all_gather(const void* send, void* recv, size_t bytes) override {
    char* out = static_cast<char*>(recv);
    std::memcpy(out, send, bytes);
    std::memset(out + bytes, 0, bytes);
    std::memcpy(out + bytes, record_.data(), std::min(bytes, record_.size()));
  }
  void barrier() override {}

 private:
  std::string record_;
};

// The names come from the peers: one that fills its whole record (no terminating NUL) must not be
// read past the record, and one that is not an epcomm segment's name must not be opened. Either is
// an error naming the rank, and our own segment is removed.
TEST(SharedMemory, APeersMalformedSegmentNameIsRefusedNamingTheRank) {
  for (const std::string& record : {std::string(64, 'x'), std::string("/someone-elses-segment")}) {
    ScriptedPeer bootstrap(record);
    try {
      cpu::PeerMemory memory(bootstrap, 4096);
      ADD_FAILURE() << "the name '" << record << "' was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInternal) << e.what();
      EXPECT_NE(std::string(e.what()).find("rank 1 sent"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(segments_of(getpid()).empty()) << "our segment was left behind";
  }
}

// A segment whose creator died unlinked is removed by the sweep; a live owner's is not.
TEST(SharedMemory, SweepRemovesOnlyOrphans) {
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  if (child == 0) {
    cpu::SharedSegment segment = cpu::SharedSegment::create_unique(4096, [] { return cpu::random_segment_name(0); });
    const char byte = 1;
    (void)!write(ready[1], &byte, 1);
    pause();  // holds the name until killed
  }
  ASSERT_GT(child, 0);
  char byte = 0;
  ASSERT_EQ(read(ready[0], &byte, 1), 1);
  cpu::remove_orphaned_segments();
  EXPECT_EQ(segments_of(child).size(), 1u) << "the segment of a live process was removed";
  kill(child, SIGKILL);  // dies holding the name
  int status = 0;
  waitpid(child, &status, 0);
  cpu::SharedSegment mine = cpu::SharedSegment::create_unique(4096, [] { return cpu::random_segment_name(0); });
  cpu::remove_orphaned_segments();
  EXPECT_TRUE(segments_of(child).empty()) << "the orphan of a killed process was kept";
  EXPECT_EQ(segments_of(getpid()).size(), 1u);  // ours stays while we live
  close(ready[0]);
  close(ready[1]);
}

// A rank killed (SIGKILL, via the test hook) after creating its segment, or after mapping its
// peers', leaves its segment behind; the next Buffer of any process removes it.
class KilledInConstruction : public ::testing::TestWithParam<const char*> {};

TEST_P(KilledInConstruction, NothingIsLeftBehind) {
  const char* step = GetParam();
  RunRanksOptions options;
  options.timeout = std::chrono::seconds(60);
  const launch::LaunchResult result = run_ranks_unchecked(
      2,
      [&](Bootstrap& bootstrap) {
        if (bootstrap.rank() == 1) setenv("EPCOMM_TEST_SHM_FAULT", step, 1);
        Buffer buffer(bootstrap, small_cpu_buffer());  // rank 0 throws: its peer died
      },
      options);
  ASSERT_EQ(result.ranks.size(), 2u);
  const launch::RankResult& killed = result.ranks[1];
  ASSERT_TRUE(killed.signaled && killed.signal == SIGKILL) << killed.how();
  EXPECT_FALSE(result.ranks[0].ok()) << "rank 0 built a Buffer with a dead peer";
  EXPECT_TRUE(segments_of(result.ranks[0].pid).empty()) << "the surviving rank left its segment";
  // The killed rank's segment is left now, unless a Buffer of a test running in parallel swept it
  // already: what must hold is that it is gone after the next Buffer.
  EXPECT_LE(segments_of(killed.pid).size(), 1u) << "at " << step;

  run_ranks(2, [](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, small_cpu_buffer());
    buffer.destroy();
  });
  EXPECT_TRUE(segments_of(killed.pid).empty()) << "the next Buffer did not remove the orphan";
}

INSTANTIATE_TEST_SUITE_P(Steps, KilledInConstruction, ::testing::Values("after_create", "after_open"));

TEST(SharedMemory, UnknownFaultStepIsNamed) {
  run_ranks(1, [](Bootstrap& bootstrap) {
    setenv("EPCOMM_TEST_SHM_FAULT", "sometimes", 1);
    try {
      Buffer buffer(bootstrap, small_cpu_buffer());
      ADD_FAILURE() << "an unknown EPCOMM_TEST_SHM_FAULT was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("EPCOMM_TEST_SHM_FAULT"), std::string::npos) << e.what();
    }
  });
}

}  // namespace
}  // namespace epcomm::testing
