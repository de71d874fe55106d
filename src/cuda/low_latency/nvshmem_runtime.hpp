// NVSHMEM for low-latency mode: initialisation through epcomm's Bootstrap (unique-id method) and
// the symmetric allocation.
//
// NVSHMEM is a process-wide library and 3.4 cannot be initialised again reliably after
// nvshmem_finalize (it keeps its bootstrap state, NVIDIA/nvshmem#68). epcomm therefore initialises
// it once, with the group of the first low-latency Buffer, and leaves it initialised until the
// process exits; later Buffers over the same group (same rank and size) reuse it. The symmetric
// heap is sized then: from $NVSHMEM_SYMMETRIC_SIZE when the user set it, else from the first
// Buffer's num_rdma_bytes (plus a margin).
#pragma once

#include <cstdint>

#include "epcomm/bootstrap.hpp"

namespace epcomm::cuda::ll {

// Collective over `bootstrap`: makes sure NVSHMEM runs on `device` with this group. Always sets
// NVSHMEM_DISABLE_NVLS=1 before initialising (NVLink multicast is not allowed on our machines);
// for a group inside one node, the unique-id bootstrap talks over the loopback interface unless
// NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME says otherwise.
void ensure_nvshmem(Bootstrap& bootstrap, int device, int64_t symmetric_bytes, bool single_node);

// Collective (nvshmem_malloc / nvshmem_free synchronise all PEs).
void* allocate_symmetric(int64_t bytes);
void free_symmetric(void* pointer);
// Collective barrier over all PEs (host side).
void nvshmem_group_barrier();
// This rank's view of `pointer` (symmetric) on rank `pe`; null when `pe` is not load/store reachable.
void* peer_pointer(void* pointer, int pe);
// Registers local device memory as a source of puts (needed by remote transports).
void register_local_buffer(void* pointer, int64_t bytes);
void unregister_local_buffer(void* pointer);

}  // namespace epcomm::cuda::ll
