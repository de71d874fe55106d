#include "cpu/shared_memory.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <utility>

#include "core/check.hpp"
#include "core/environment.hpp"

namespace epcomm::cpu {
namespace {

constexpr size_t kNameBytes = 64;
constexpr int kNameAttempts = 8;
constexpr const char* kShmDirectory = "/dev/shm";  // where glibc's shm_open keeps its names
constexpr const char* kPrefix = "epcomm-";

[[noreturn]] void throw_system(const char* call, const std::string& name, size_t bytes) {
  const int err = errno;
  throw_error(err == ENOMEM || err == ENOSPC ? ErrorCode::kOutOfCapacity : ErrorCode::kInternal,
              concat("shared memory: ", call, "(", name, ", ", bytes, " bytes) failed: ", std::strerror(err)));
}

std::byte* map(int fd, const std::string& name, size_t bytes) {
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (data == MAP_FAILED) throw_system("mmap", name, bytes);
  return static_cast<std::byte*>(data);
}

uint64_t random_bits() {
  uint64_t bits = 0;
  if (getrandom(&bits, sizeof(bits), 0) == sizeof(bits)) return bits;
  std::random_device device;  // getrandom unavailable: the library's own source
  return (uint64_t(device()) << 32) ^ device();
}

// Test hook ($EPCOMM_TEST_SHM_FAULT, core/environment.cpp): dies like a killed rank at `step`.
void fault_point(const char* step) {
  const std::optional<std::string> fault = env_text("EPCOMM_TEST_SHM_FAULT");
  if (!fault) return;
  require(*fault == "after_create" || *fault == "after_open", "Buffer", "EPCOMM_TEST_SHM_FAULT",
          "expected after_create or after_open, got '", *fault, "'");
  if (*fault == step) ::kill(::getpid(), SIGKILL);
}

// The creator's pid in "epcomm-<pid>-...", or 0.
pid_t creator_of(const char* file_name) {
  if (std::strncmp(file_name, kPrefix, std::strlen(kPrefix)) != 0) return 0;
  char* end = nullptr;
  const long pid = std::strtol(file_name + std::strlen(kPrefix), &end, 10);
  return pid > 0 && *end == '-' ? static_cast<pid_t>(pid) : 0;
}

bool is_dead(pid_t pid) { return ::kill(pid, 0) != 0 && errno == ESRCH; }

// Unlinks /<file_name> if nobody holds its lock. Another user's segment does not open (mode 0600).
bool remove_if_unlocked(const char* file_name) {
  const std::string name = std::string("/") + file_name;
  const int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) return false;
  const bool orphaned = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
  if (orphaned) shm_unlink(name.c_str());
  ::close(fd);
  return orphaned;
}

// The segment name in rank `rank`'s record of the all-gather: data from a peer, so it is checked to
// end inside its record and to be an epcomm segment's name before anything reads or opens it.
std::string peer_segment_name(const char* record, int rank) {
  const size_t length = strnlen(record, kNameBytes);
  const std::string name(record, length);
  const std::string expected_start = std::string("/") + kPrefix;
  if (length == kNameBytes || !name.starts_with(expected_start))
    throw_error(
        ErrorCode::kInternal,
        concat("shared memory: rank ", rank, " sent '", name, "'", length == kNameBytes ? " (not NUL-terminated)" : "",
               " where the name of its segment (", expected_start, "...) belongs; do all ranks run the same epcomm?"));
  return name;
}

}  // namespace

std::string random_segment_name(int rank) {
  char suffix[17];
  std::snprintf(suffix, sizeof(suffix), "%016llx", static_cast<unsigned long long>(random_bits()));
  return concat("/", kPrefix, ::getpid(), "-", rank, "-", suffix);
}

int remove_orphaned_segments() noexcept {
  DIR* directory = ::opendir(kShmDirectory);
  if (directory == nullptr) return 0;
  int removed = 0;
  while (const dirent* entry = ::readdir(directory)) {
    const pid_t creator = creator_of(entry->d_name);
    // Both tests: a live pid may be a reused one (kept, harmless); a free lock alone may be a
    // creator between its shm_open and its flock.
    if (creator != 0 && is_dead(creator) && remove_if_unlocked(entry->d_name)) ++removed;
  }
  ::closedir(directory);
  return removed;
}

SharedSegment SharedSegment::create_unique(size_t bytes, const std::function<std::string()>& next_name) {
  std::string name;
  int fd = -1;
  for (int attempt = 0; attempt < kNameAttempts && fd < 0; ++attempt) {
    name = next_name();
    fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0 && errno != EEXIST) throw_system("shm_open", name, bytes);
  }
  if (fd < 0)
    throw_error(ErrorCode::kInternal,
                concat("shared memory: shm_open: ", kNameAttempts, " fresh names existed already (last: ", name, ")"));
  SharedSegment segment;
  segment.name_ = name;
  segment.owner_ = true;
  segment.size_ = bytes;
  segment.lock_fd_ = fd;  // closed (and unlinked) by release() on every error below
  if (::flock(fd, LOCK_EX) != 0) throw_system("flock", name, bytes);
  fault_point("after_create");
  // posix_fallocate reserves the pages now, so a full /dev/shm fails here instead of with SIGBUS later.
  const int status = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (status != 0) {
    errno = status;
    throw_system("posix_fallocate", name, bytes);
  }
  segment.data_ = map(fd, name, bytes);
  return segment;
}

SharedSegment SharedSegment::open(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) throw_system("shm_open", name, bytes);
  SharedSegment segment;
  segment.name_ = name;
  segment.size_ = bytes;
  try {
    // Mapping past the end of the file succeeds, and the first access there is a SIGBUS.
    struct stat info {};
    if (::fstat(fd, &info) != 0) throw_system("fstat", name, bytes);
    if (static_cast<uint64_t>(info.st_size) < bytes)
      throw_error(ErrorCode::kInternal, concat("shared memory: segment ", name, " holds ", info.st_size,
                                               " bytes, fewer than the ", bytes, " bytes expected of it"));
    segment.data_ = map(fd, name, bytes);
  } catch (...) {
    close(fd);
    throw;
  }
  close(fd);
  return segment;
}

SharedSegment::~SharedSegment() { release(); }

SharedSegment::SharedSegment(SharedSegment&& other) noexcept { *this = std::move(other); }

SharedSegment& SharedSegment::operator=(SharedSegment&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    name_ = std::move(other.name_);
    owner_ = std::exchange(other.owner_, false);
    lock_fd_ = std::exchange(other.lock_fd_, -1);
  }
  return *this;
}

void SharedSegment::unlink() noexcept {
  if (owner_) shm_unlink(name_.c_str());
  owner_ = false;
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the lock: the name is gone already
  lock_fd_ = -1;
}

void SharedSegment::release() noexcept {
  if (data_ != nullptr) munmap(data_, size_);
  data_ = nullptr;
  unlink();
}

PeerMemory::PeerMemory(Bootstrap& bootstrap, size_t bytes_per_rank) : rank_(bootstrap.rank()), bytes_(bytes_per_rank) {
  const int num_ranks = bootstrap.size();
  segments_.resize(num_ranks);
  remove_orphaned_segments();  // of ranks killed inside an earlier construction
  const int rank = rank_;
  segments_[rank_] = SharedSegment::create_unique(bytes_per_rank, [rank] { return random_segment_name(rank); });

  char mine[kNameBytes] = {};
  std::snprintf(mine, kNameBytes, "%s", segments_[rank_].name().c_str());
  std::vector<char> names(kNameBytes * num_ranks);
  bootstrap.all_gather(mine, names.data(), kNameBytes);
  for (int r = 0; r < num_ranks; ++r)
    if (r != rank_) segments_[r] = SharedSegment::open(peer_segment_name(&names[r * kNameBytes], r), bytes_per_rank);
  fault_point("after_open");
  // Once every rank has mapped every segment the names are no longer needed: unlinking now means
  // nothing is left in /dev/shm even if a process dies later.
  bootstrap.barrier();
  segments_[rank_].unlink();
}

void PeerMemory::release() noexcept {
  for (SharedSegment& segment : segments_) segment.release();
}

}  // namespace epcomm::cpu
