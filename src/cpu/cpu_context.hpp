// What the parts of the CPU backend share. Each rank's shared segment is laid out as
//   | sync counters (kSyncBlockBytes) | normal-mode area (num_nvl_bytes) | low-latency area (num_rdma_bytes) |
// and GroupSync channels are split between the modes so that their steps never interleave.
#pragma once

#include <chrono>
#include <cstddef>

#include "core/backend.hpp"
#include "cpu/group_sync.hpp"
#include "cpu/shared_memory.hpp"

namespace epcomm::cpu {

constexpr int kNormalChannel = 0;           // normal mode: channels 0..7
constexpr int kLowLatencyFirstChannel = 8;  // low-latency mode: channels 8..15

// One mode's window into every rank's segment.
struct Area {
  const PeerMemory* memory = nullptr;
  size_t offset = 0;  // from the start of each segment
  size_t bytes = 0;
  std::byte* of(int rank) const { return memory->base(rank) + offset; }
};

struct CpuContext {
  GroupGeometry geometry;
  const BufferOptions* options = nullptr;
  GroupSync* sync = nullptr;
  uint64_t buffer_id = 0;  // Backend::id() of the CpuBackend, stamped into handles
};

}  // namespace epcomm::cpu
