// The CPU backend's communication memory: one POSIX shared-memory segment per rank, mapped by every
// rank of the group, so that a rank reads and writes its peers' memory with plain loads and stores
// (the CPU stand-in for NVLink).
//
// Nothing is left in /dev/shm (SPEC §5): a segment's name is removed as soon as every rank has
// mapped it, and one whose creator died before that (killed at any step of the construction) is
// removed by the next PeerMemory of any process of the same user: names carry the creator's pid,
// and the creator holds a lock on the segment until it removes the name, so a segment whose pid is
// dead and whose lock is free is known to be orphaned. Names end in 64 random bits, and a name that
// exists already (another user's, or planted) is skipped for a fresh one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"

namespace epcomm::cpu {

// One mapping of a named segment. Owner = the rank that created (and will unlink) it.
class SharedSegment {
 public:
  SharedSegment() = default;
  // Creates a new zero-filled segment under the first name of `next_name()` that does not exist yet
  // (O_EXCL; a few attempts, then an error). The owner holds the segment's lock until unlink().
  static SharedSegment create_unique(size_t bytes, const std::function<std::string()>& next_name);
  static SharedSegment open(const std::string& name, size_t bytes);
  ~SharedSegment();
  SharedSegment(SharedSegment&& other) noexcept;
  SharedSegment& operator=(SharedSegment&& other) noexcept;
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  // Removes the name (the mapping stays) if this mapping created it. Never throws.
  void unlink() noexcept;
  // Unmaps, and unlinks the name if this mapping created it. Idempotent, never throws.
  void release() noexcept;

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
  std::string name_;
  bool owner_ = false;
  int lock_fd_ = -1;  // the owner's descriptor, locked until unlink()
};

// "/epcomm-<pid>-<rank>-<16 random hex digits>": the pid lets a later process find orphans.
std::string random_segment_name(int rank);
// Removes this user's epcomm segments whose creator is dead (see the top). Returns how many. Never throws.
int remove_orphaned_segments() noexcept;

// Every rank's segment, mapped in this process. Collective construction over the bootstrap.
class PeerMemory {
 public:
  PeerMemory(Bootstrap& bootstrap, size_t bytes_per_rank);
  std::byte* base(int rank) const { return segments_[rank].data(); }
  std::byte* local() const { return base(rank_); }
  size_t bytes_per_rank() const { return bytes_; }
  int num_ranks() const { return static_cast<int>(segments_.size()); }
  // Unmaps every peer; unlinks our own name. Never throws.
  void release() noexcept;

 private:
  int rank_ = 0;
  size_t bytes_ = 0;
  std::vector<SharedSegment> segments_;
};

}  // namespace epcomm::cpu
