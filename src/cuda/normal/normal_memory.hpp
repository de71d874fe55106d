// This rank's normal-mode memory (num_nvl_bytes of device memory) and the same memory of every other
// rank of its node, mapped into this process through CUDA IPC. Peers index it by their rank in the
// node. Works for one GPU per rank and for several ranks (processes) sharing one GPU.
#pragma once

#include <array>
#include <cstdint>

#include "core/backend.hpp"
#include "cuda/normal/protocol.hpp"

namespace epcomm::cuda {

class NormalMemory {
 public:
  // Collective over `bootstrap` (every rank of the group, also of other nodes). The current device
  // must be this rank's device. Zeroes the control region before anyone can reach it.
  NormalMemory(Bootstrap& bootstrap, const GroupGeometry& geometry, int64_t bytes);
  ~NormalMemory() { release(nullptr); }
  NormalMemory(const NormalMemory&) = delete;
  NormalMemory& operator=(const NormalMemory&) = delete;

  int64_t bytes() const { return bytes_; }
  char* local() const { return local_; }
  // Base address of the memory of the rank `node_rank` of this node (this rank included).
  char* peer(int node_rank) const { return peers_[node_rank]; }
  const std::array<char*, kMaxNvlRanks>& peers() const { return peers_; }

  // Unmaps the peers and frees our memory. With a bootstrap: collective, first waits until no rank
  // can still touch our memory (callers have drained their streams). Without: local only, never
  // throws. Idempotent.
  void release(Bootstrap* bootstrap);

 private:
  int64_t bytes_ = 0;
  int node_rank_ = 0;
  char* local_ = nullptr;
  std::array<char*, kMaxNvlRanks> peers_{};
  std::array<bool, kMaxNvlRanks> opened_{};  // mapped with cudaIpcOpenMemHandle (ours to close)
};

}  // namespace epcomm::cuda
