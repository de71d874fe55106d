#include "cuda/normal/normal_memory.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/check.hpp"
#include "core/cuda_check.hpp"

namespace epcomm::cuda {
namespace {

// What each rank tells the group about its memory.
struct Announcement {
  cudaIpcMemHandle_t handle;
  uint64_t address;  // for peers in the same process, which cannot open our handle
  int64_t bytes;
  int32_t pid;
  int32_t device;
};

}  // namespace

NormalMemory::NormalMemory(Bootstrap& bootstrap, const GroupGeometry& geometry, int64_t bytes) : bytes_(bytes) {
  const int G = geometry.ranks_per_node;
  const int node = geometry.node_of(geometry.rank);
  node_rank_ = geometry.rank - node * G;
  require(G <= kMaxNvlRanks, "Buffer", "ranks_per_node", "at most ", kMaxNvlRanks, ", got ", G);

  Announcement mine{};
  if (bytes > 0) {
    EPCOMM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&local_), static_cast<size_t>(bytes)));
    EPCOMM_CUDA_CHECK(cudaMemset(local_, 0, static_cast<size_t>(std::min<int64_t>(bytes, kNormalControlBytes))));
    EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
    EPCOMM_CUDA_CHECK(cudaIpcGetMemHandle(&mine.handle, local_));
  }
  mine.address = reinterpret_cast<uint64_t>(local_);
  mine.bytes = bytes;
  mine.pid = static_cast<int32_t>(getpid());
  EPCOMM_CUDA_CHECK(cudaGetDevice(&mine.device));

  // The all-gather is also the barrier after which every rank's control region is zero.
  std::vector<Announcement> all(geometry.num_ranks);
  bootstrap.all_gather(&mine, all.data(), sizeof(Announcement));
  if (bytes == 0) return;

  try {
    for (int i = 0; i < G; ++i) {
      const int rank = node * G + i;
      const Announcement& theirs = all[rank];
      if (i == node_rank_) {
        peers_[i] = local_;
      } else if (theirs.pid == mine.pid) {
        peers_[i] = reinterpret_cast<char*>(theirs.address);
      } else {
        void* mapped = nullptr;
        const cudaError_t status = cudaIpcOpenMemHandle(&mapped, theirs.handle, cudaIpcMemLazyEnablePeerAccess);
        if (status != cudaSuccess) {
          (void)cudaGetLastError();
          throw_error(ErrorCode::kInternal,
                      concat("Buffer: mapping the normal-mode memory of rank ", rank, " (GPU ", theirs.device,
                             " of process ", theirs.pid, ") into rank ", geometry.rank, " (GPU ", mine.device,
                             ") failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status),
                             "); the ranks of a node need peer access (NVLink or PCIe P2P) or a shared GPU"));
        }
        peers_[i] = static_cast<char*>(mapped);
        opened_[i] = true;
      }
    }
  } catch (...) {
    release(nullptr);
    throw;
  }
}

void NormalMemory::release(Bootstrap* bootstrap) {
  if (bootstrap != nullptr) bootstrap->barrier();  // no peer kernel can still write into our memory
  for (int i = 0; i < kMaxNvlRanks; ++i) {
    if (opened_[i]) cudaIpcCloseMemHandle(peers_[i]);
    opened_[i] = false;
    peers_[i] = nullptr;
  }
  if (bootstrap != nullptr) bootstrap->barrier();  // every importer has unmapped our memory
  if (local_ != nullptr) cudaFree(local_);
  local_ = nullptr;
  (void)cudaGetLastError();
}

}  // namespace epcomm::cuda
