// The CPU backend's communication memory: one POSIX shared-memory segment per rank, mapped by every
// rank of the group, so that a rank reads and writes its peers' memory with plain loads and stores
// (the CPU stand-in for NVLink).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"

namespace epcomm::cpu {

// One mapping of a named segment. Owner = the rank that created (and will unlink) it.
class SharedSegment {
 public:
  SharedSegment() = default;
  static SharedSegment create(const std::string& name, size_t bytes);  // zero-filled
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
};

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
