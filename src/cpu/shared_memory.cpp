#include "cpu/shared_memory.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "core/check.hpp"

namespace epcomm::cpu {
namespace {

constexpr size_t kNameBytes = 64;

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

std::string unique_name(int rank) {
  static std::atomic<int> counter{0};
  return concat("/epcomm-", getpid(), "-", rank, "-", counter.fetch_add(1));
}

}  // namespace

SharedSegment SharedSegment::create(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) throw_system("shm_open", name, bytes);
  SharedSegment segment;
  segment.name_ = name;
  segment.owner_ = true;
  segment.size_ = bytes;
  // posix_fallocate reserves the pages now, so a full /dev/shm fails here instead of with SIGBUS later.
  const int status = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (status != 0) {
    errno = status;
    close(fd);
    shm_unlink(name.c_str());
    throw_system("posix_fallocate", name, bytes);
  }
  try {
    segment.data_ = map(fd, name, bytes);
  } catch (...) {
    close(fd);
    shm_unlink(name.c_str());
    throw;
  }
  close(fd);
  return segment;
}

SharedSegment SharedSegment::open(const std::string& name, size_t bytes) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) throw_system("shm_open", name, bytes);
  SharedSegment segment;
  segment.name_ = name;
  segment.size_ = bytes;
  try {
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
  }
  return *this;
}

void SharedSegment::unlink() noexcept {
  if (owner_) shm_unlink(name_.c_str());
  owner_ = false;
}

void SharedSegment::release() noexcept {
  if (data_ != nullptr) munmap(data_, size_);
  data_ = nullptr;
  unlink();
}

PeerMemory::PeerMemory(Bootstrap& bootstrap, size_t bytes_per_rank) : rank_(bootstrap.rank()), bytes_(bytes_per_rank) {
  const int num_ranks = bootstrap.size();
  segments_.resize(num_ranks);
  segments_[rank_] = SharedSegment::create(unique_name(rank_), bytes_per_rank);

  char mine[kNameBytes] = {};
  std::snprintf(mine, kNameBytes, "%s", segments_[rank_].name().c_str());
  std::vector<char> names(kNameBytes * num_ranks);
  bootstrap.all_gather(mine, names.data(), kNameBytes);
  for (int r = 0; r < num_ranks; ++r)
    if (r != rank_) segments_[r] = SharedSegment::open(std::string(&names[r * kNameBytes]), bytes_per_rank);
  // Once every rank has mapped every segment the names are no longer needed: unlinking now means
  // nothing is left in /dev/shm even if a process dies later.
  bootstrap.barrier();
  segments_[rank_].unlink();
}

void PeerMemory::release() noexcept {
  for (SharedSegment& segment : segments_) segment.release();
}

}  // namespace epcomm::cpu
