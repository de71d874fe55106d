#include "cuda/low_latency/nvshmem_runtime.hpp"

#include <nvshmem_host.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "core/cuda_check.hpp"
#include "core/environment.hpp"
#include "core/layouts.hpp"

namespace epcomm::cuda::ll {
namespace {

// Symmetric heap margin over num_rdma_bytes: nvshmem_malloc rounds and aligns.
constexpr int64_t kHeapMargin = int64_t(32) << 20;

struct InitMessage {
  int32_t ok = 0;  // rank 0 got a unique id
  int32_t pad = 0;
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
};

std::mutex g_mutex;

// NVSHMEM's defaults cost GPU memory epcomm never uses; each is set only when the user has not set
// the variable (setenv without overwrite):
//   - NVSHMEM_DISABLE_NCCL=1: with libnccl.so.2 loadable, NVSHMEM 3.4 creates an NCCL communicator
//     for each of its predefined teams at start-up (world, shared, node, ...; each with NCCL's
//     buffers). epcomm uses no NVSHMEM collective (only nvshmem_barrier_all and malloc/free, which
//     work without NCCL).
//   - NVSHMEM_CUMEM_GRANULARITY=2 MiB (the CUDA minimum on Hopper): the symmetric heap grows, and its
//     static form is rounded, in steps of this size; the default 512 MiB maps half a GiB for a
//     buffer of tens of MB.
//   - NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=1 when every rank is on this node: on an NVLink-only machine
//     NVSHMEM runs no proxy thread (a host core spinning for remote transports and device-side
//     global exit, neither of which epcomm uses). Ignored where a remote transport is set up.
constexpr const char* kGranularity = "2097152";

void set_environment(int64_t symmetric_bytes, bool single_node) {
  // Multicast objects can take a shared host's GPUs out of service: never let NVSHMEM create one.
  setenv("NVSHMEM_DISABLE_NVLS", "1", 1);
  setenv("NVSHMEM_DISABLE_NCCL", "1", 0);
  setenv("NVSHMEM_CUMEM_GRANULARITY", kGranularity, 0);
  if (single_node) {
    setenv("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo", 0);
    setenv("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY", "1", 0);
  }
  if (!env_text("NVSHMEM_SYMMETRIC_SIZE")) {
    const int64_t heap = align_up(symmetric_bytes, int64_t(2) << 20) + kHeapMargin;
    setenv("NVSHMEM_SYMMETRIC_SIZE", std::to_string(heap).c_str(), 1);
  }
}

// Every rank must agree on whether NVSHMEM is already up (e.g. from an earlier Buffer).
bool already_initialized_everywhere(Bootstrap& bootstrap) {
  const int32_t mine = nvshmemx_init_status() >= NVSHMEM_STATUS_IS_INITIALIZED ? 1 : 0;
  std::vector<int32_t> all(bootstrap.size());
  bootstrap.all_gather(&mine, all.data(), sizeof(mine));
  for (int r = 0; r < bootstrap.size(); ++r)
    if (all[r] != mine)
      throw_error(ErrorCode::kInternal, concat("Buffer: NVSHMEM is initialised on rank ", mine ? bootstrap.rank() : r,
                                               " but not on rank ", mine ? r : bootstrap.rank(),
                                               ": every rank must create its low-latency Buffers in the same order"));
  return mine != 0;
}

void check_group(Bootstrap& bootstrap) {
  const int pe = nvshmem_my_pe(), num_pes = nvshmem_n_pes();
  if (pe != bootstrap.rank() || num_pes != bootstrap.size())
    throw_error(ErrorCode::kUnsupported,
                concat("Buffer: NVSHMEM already runs in this process as PE ", pe, " of ", num_pes,
                       ", but this group is rank ", bootstrap.rank(), " of ", bootstrap.size(),
                       ": low-latency Buffers of one process must use the same group"));
}

void initialize(Bootstrap& bootstrap, int64_t symmetric_bytes, bool single_node) {
  set_environment(symmetric_bytes, single_node);
  InitMessage mine;
  if (bootstrap.rank() == 0) mine.ok = nvshmemx_get_uniqueid(&mine.id) == 0 ? 1 : 0;
  std::vector<InitMessage> all(bootstrap.size());
  bootstrap.all_gather(&mine, all.data(), sizeof(InitMessage));
  if (all[0].ok == 0) throw_error(ErrorCode::kInternal, "Buffer: nvshmemx_get_uniqueid failed on rank 0");
  nvshmemx_uniqueid_t id = all[0].id;
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(bootstrap.rank(), bootstrap.size(), &id, &attr) != 0)
    throw_error(ErrorCode::kInternal, "Buffer: nvshmemx_set_attr_uniqueid_args failed");
  // nvshmemx_init_attr() is this call plus exit() on failure; a library must not end its host
  // process, so the status is turned into an exception here instead.
  nvshmemx_init_init_attr_ver_only(attr);
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  int provided = 0;
  const int status =
      nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
  if (status != 0)
    throw_error(ErrorCode::kInternal, concat("Buffer: NVSHMEM initialisation failed with status ", status,
                                             " (set NVSHMEM_DEBUG=INFO for details)"));
}

}  // namespace

void ensure_nvshmem(Bootstrap& bootstrap, int device, int64_t symmetric_bytes, bool single_node) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard(device);
  if (!already_initialized_everywhere(bootstrap)) initialize(bootstrap, symmetric_bytes, single_node);
  check_group(bootstrap);
}

void* allocate_symmetric(int64_t bytes) {
  void* pointer = nvshmem_malloc(static_cast<size_t>(bytes));
  if (pointer == nullptr) {
    const std::string env = env_text("NVSHMEM_SYMMETRIC_SIZE").value_or("(default)");
    throw_error(ErrorCode::kOutOfCapacity,
                concat("Buffer: num_rdma_bytes: nvshmem_malloc(", bytes, ") failed; the NVSHMEM symmetric heap is ",
                       env, " bytes, sized when the first low-latency Buffer of this process was ",
                       "created: set NVSHMEM_SYMMETRIC_SIZE larger before that"));
  }
  return pointer;
}

void free_symmetric(void* pointer) {
  if (pointer != nullptr) nvshmem_free(pointer);
}

void nvshmem_group_barrier() { nvshmem_barrier_all(); }

void* peer_pointer(void* pointer, int pe) { return nvshmem_ptr(pointer, pe); }

void register_local_buffer(void* pointer, int64_t bytes) {
  if (nvshmemx_buffer_register(pointer, static_cast<size_t>(bytes)) != 0)
    throw_error(ErrorCode::kInternal, concat("low-latency mode: nvshmemx_buffer_register(", bytes, " bytes) failed"));
}

void unregister_local_buffer(void* pointer) { nvshmemx_buffer_unregister(pointer); }

}  // namespace epcomm::cuda::ll
