// The job-status page: how epcomm-run (the writer, src/launcher/) tells its ranks (the readers,
// job_monitor.cpp) that one of them has ended, so that a rank waiting in shared memory for a peer
// that is gone hears it at once instead of at its timeout. Header-only, like wire.hpp, so that the
// launcher does not depend on libepcomm.
//
// The page lives in a memfd (no name anywhere: nothing outlives the job), inherited by the ranks;
// EPCOMM_JOB_STATUS_FD names its descriptor. Layout, every field written by the launcher only:
//   bytes 0..63     Header: magic, world size, the job's random token
//   64 + 64 * r     Slot of rank r: `ended` (0 while running, 1 once the launcher reaped it), then
//                   how it ended as text ("exited with code 0"), written before `ended` (release)
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace epcomm::job_status {

constexpr uint32_t kMagic = 0x4a435045;  // "EPCJ" as little-endian bytes
constexpr size_t kHeaderBytes = 64;
constexpr size_t kSlotBytes = 64;
constexpr size_t kHowBytes = kSlotBytes - 8;
constexpr const char* kFdVariable = "EPCOMM_JOB_STATUS_FD";

struct Header {
  uint32_t magic;
  uint32_t world_size;
  uint64_t token;
};

struct Slot {
  std::atomic<uint32_t> ended;
  uint32_t reserved;
  char how[kHowBytes];  // NUL-terminated
};

static_assert(sizeof(Header) <= kHeaderBytes && sizeof(Slot) == kSlotBytes);
static_assert(std::atomic<uint32_t>::is_always_lock_free, "the page is shared between processes");

inline size_t page_bytes(int world_size) { return kHeaderBytes + kSlotBytes * static_cast<size_t>(world_size); }
inline Header* header(void* page) { return static_cast<Header*>(page); }
inline const Header* header(const void* page) { return static_cast<const Header*>(page); }
inline Slot* slot(void* page, int rank) {
  return reinterpret_cast<Slot*>(static_cast<std::byte*>(page) + kHeaderBytes + kSlotBytes * rank);
}
inline const Slot* slot(const void* page, int rank) {
  return reinterpret_cast<const Slot*>(static_cast<const std::byte*>(page) + kHeaderBytes + kSlotBytes * rank);
}

}  // namespace epcomm::job_status
