// Device building blocks of the low-latency kernels: the payload chunks, the peer table, the arrival
// signals and the waits for them, error reporting. The memory operations, the bounded wait and the
// launch helper are shared with normal mode (cuda/device/ptx.cuh, errors.cuh, launch.hpp).
//
// Memory ordering (PTX memory model), narrowest scope that is correct:
//   - Data to a peer goes with plain (weak) 16-byte stores. When a sending block is done, it
//     __syncthreads, then warp 0 adds to every destination's flag with red.release.sys (one lane per
//     destination): the release is cumulative over the stores the barrier ordered before it, so a
//     peer that reads the flag with ld.acquire.sys sees every store of the block. No block waits for
//     another: a call's flag at a destination is complete when every sending block has added, which
//     the values make exact (kFlagDone, signal_value).
//   - A receiver polls its flag with ld.acquire.sys, then __syncthreads, then reads the data with
//     ld.global.cg (L2; the data was written by another GPU and is read once).
//   - Who clears the flags for the next call is intra-GPU bookkeeping: .gpu-scoped release/acquire.
#pragma once

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "cuda/device/errors.cuh"
#include "cuda/device/launch.hpp"
#include "cuda/low_latency/ll_params.hpp"

namespace epcomm::cuda::ll {

using device::global_timer_ns;
using device::kCopyUnroll;
using device::load_cg_16;
using device::load_nc_16;
using device::store_cg_16;

// A warp moves payloads in parts of one chunk: 32 lanes x kCopyUnroll 16-byte vectors, vectors
// [first, first + kPartVectors) of a row. The parts of a row go to different warps, so that each
// warp has a single round trip of loads per part.
constexpr int kPartVectors = 32 * kCopyUnroll;

struct Chunk {
  uint4 v[kCopyUnroll];
};

// `load` reads one 16-byte vector: load_nc_16 for kernel inputs, load_cg_16 for what peers wrote.
template <class Load>
__device__ __forceinline__ void load_chunk(const uint8_t* src, int first, int num_vectors, Chunk& chunk, Load load) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int u = 0; u < kCopyUnroll; ++u) {
    const int v = first + u * 32 + lane;
    if (v < num_vectors) chunk.v[u] = load(src + 16 * int64_t(v));
  }
}

__device__ __forceinline__ void store_chunk(uint8_t* dst, int first, int num_vectors, const Chunk& chunk) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int u = 0; u < kCopyUnroll; ++u) {
    const int v = first + u * 32 + lane;
    if (v < num_vectors) store_cg_16(dst + 16 * int64_t(v), chunk.v[u]);
  }
}

// A timeout anywhere in this Buffer (cuda/device/errors.cuh): every wait gives up at once.
__device__ __forceinline__ bool aborted(const Common& c) { return device::aborted(c.errors); }

// Records the first error of this Buffer in its host-visible word (cuda/device/errors.cuh); a
// timeout also raises the abort flag.
__device__ __forceinline__ void record_error(const Common& c, DeviceErrorKind kind, DevicePhase phase, int peer,
                                             int64_t value, int32_t detail = 0) {
  device::report_error(c.errors, kind, phase, peer, value, detail);
}

__device__ __forceinline__ bool is_masked(const Common& c, int r) { return device::load_relaxed_gpu(c.mask + r) != 0; }

__device__ __forceinline__ uint64_t* local_flag(const Common& c, int set, int source) {
  return reinterpret_cast<uint64_t*>(c.local + ControlLayout::flag(set, source));
}

// The peers as one call sees them, copied into shared memory by every block at its start (one
// load per rank, all in flight together with the block's first input loads) so that no later
// decision waits on global memory.
struct PeerTable {
  uint8_t** base;   // [R] rank r's symmetric memory as mapped here; null: reached with NVSHMEM puts
  int32_t* usable;  // [R] 1: exchange with r in this call (r is not masked)
};

__host__ __device__ constexpr size_t peer_table_bytes(int num_ranks) {
  return size_t(num_ranks) * (sizeof(uint8_t*) + sizeof(int32_t));
}

// `smem`: peer_table_bytes(R) bytes of shared memory, 8-byte aligned.
__device__ __forceinline__ PeerTable peer_table_at(const Common& c, void* smem) {
  uint8_t** base = static_cast<uint8_t**>(smem);
  return PeerTable{base, reinterpret_cast<int32_t*>(base + c.num_ranks)};
}

// Every thread calls; the caller synchronises the block before reading the table.
__device__ __forceinline__ void load_peer_table(const Common& c, const PeerTable& peers) {
  for (int r = threadIdx.x; r < c.num_ranks; r += blockDim.x) {
    peers.base[r] = reinterpret_cast<uint8_t*>(c.peer_bases[r]);
    peers.usable[r] = is_masked(c, r) ? 0 : 1;
  }
}

// ---- arrival flags -----------------------------------------------------------------------------
// Flag [set][s] at rank d sums what source s's sending blocks added for the current call of that
// set. Each of the G sending blocks adds signal_value(b, G): 1, plus kFlagDone - G for block 0.
// The sum is kFlagDone exactly when all G blocks have added: a subset without block 0 sums to at
// most G - 1, one with block 0 and k < G - 1 others to kFlagDone - (G - 1 - k). The receiver does
// not need to know G. The receiver that consumed the flag sets it back to 0.
constexpr uint64_t kFlagDone = uint64_t(1) << 32;

__device__ __forceinline__ uint64_t signal_value(int block, int num_blocks) {
  return block == 0 ? kFlagDone - uint64_t(num_blocks) + 1 : uint64_t(1);
}

// Called by every thread of a sending block when its stores and puts are issued: the block
// barrier, then warp 0 adds `value` to this rank's flag in `set` at every usable destination.
//
// With put peers, the puts of every warp of the block must be delivered before any of their flags:
//   - nvshmem_quiet by thread 0 after the barrier completes the puts the block issued through a
//     remote transport (the proxy or the NIC works through them in order);
//   - puts NVSHMEM carries over NVLink (emulated nodes, kAll) are the block's own weak stores to the
//     peer, and nvshmemx_signal_op adds with a relaxed system-scope atomic: each signalling lane
//     issues fence.acq_rel.sys before it, which with the barrier makes it a release of the whole
//     block's stores (the PTX pattern the store path gets from red.release.sys).
// The store path (no put peers) is unchanged: barrier, red.release.sys.
__device__ __forceinline__ void signal_destinations(const Common& c, int set, const PeerTable& peers, uint64_t value) {
  __syncthreads();
  if (c.has_put_peers) {
    if (threadIdx.x == 0) nvshmem_quiet();  // puts delivered before the flags go out
    __syncthreads();
  }
  if (threadIdx.x >= 32) return;
  const int64_t offset = ControlLayout::flag(set, c.rank);
  for (int d = threadIdx.x; d < c.num_ranks; d += 32) {
    if (!peers.usable[d]) continue;
    uint8_t* base = peers.base[d];
    if (base != nullptr) {
      device::add_release_sys(reinterpret_cast<uint64_t*>(base + offset), value);
    } else {
      device::fence_acq_rel_sys();
      nvshmemx_signal_op(reinterpret_cast<uint64_t*>(c.local + offset), value, NVSHMEM_SIGNAL_ADD, d);
    }
  }
}

// Programmatic dependent launch (sm_90): a send kernel lets the receive kernel queued behind it
// start at once (the receive kernel synchronises through the flags, not through kernel order), and
// the receive kernel waits for the send kernel's completion only at its very end, so that work
// queued after the call still runs after both kernels.
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void wait_for_preceding_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

using device::WaitResult;

// Polls `flag` (ld.acquire.sys; the abort flag and the clock every 64 polls) until it reads
// kFlagDone, timeout_ns after `start` pass or the rank aborts.
__device__ __forceinline__ WaitResult wait_flag(const Common& c, const uint64_t* flag, uint64_t start,
                                                uint64_t timeout_ns) {
  uint64_t seen = 0;
  return device::wait_until<device::AcquireScope::kSys, 64>(
      flag, [](uint64_t value) { return value == kFlagDone; }, seen, start, timeout_ns, c.errors);
}

// The receive-side counters of one flag set: `gate` (enable_shrink: block 0 has settled who is
// masked) and `readers` (blocks that have passed the wait).
struct ReceiveCounters {
  uint32_t* gate;
  uint32_t* readers;
};

// Waits until every usable source has completed its flag in `set` (every thread of the block
// calls; `peers` is loaded, not yet synchronised). Returns false in every thread when the call must
// be abandoned. Without enable_shrink each block waits by itself; a timeout is an error naming the
// source. With enable_shrink block 0 alone waits, masks the sources that time out and then opens
// the gate for the other blocks, which re-read the mask after it, so that every block of the call
// agrees on who is usable.
//
// Once the block has passed, thread 0 adds to `readers` (release, .gpu) and keeps the old value in
// `ticket`, used only by release_flags() at the end of the kernel: the add's latency hides behind
// the block's work.
__device__ __forceinline__ bool wait_for_sources(const Common& c, int set, DevicePhase phase, int64_t* wait_stats,
                                                 ReceiveCounters counters, const PeerTable& peers, uint32_t& ticket) {
  __syncthreads();  // the peer table is complete
  const uint64_t start = global_timer_ns();
  const bool waits_itself = !c.shrink || blockIdx.x == 0;
  int my_failure = 0;
  if (waits_itself) {
    for (int s = threadIdx.x; s < c.num_ranks; s += blockDim.x) {
      if (!peers.usable[s]) continue;
      const WaitResult result = wait_flag(c, local_flag(c, set, s), start, c.timeout_ns);
      if (result == WaitResult::kTimedOut && c.shrink) {
        atomicExch(reinterpret_cast<uint32_t*>(c.mask + s), 1u);  // SPEC §6: skip the late rank from now on
        peers.usable[s] = 0;
      } else if (result == WaitResult::kTimedOut) {
        record_error(c, DeviceErrorKind::kTimeout, phase, s, static_cast<int64_t>(c.timeout_ns));
        my_failure = 1;
      } else if (result == WaitResult::kAborted) {
        my_failure = 1;
      }
      if (blockIdx.x == 0 && wait_stats != nullptr)
        atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + s),
                  static_cast<unsigned long long>(global_timer_ns() - start));
    }
  }
  bool failed = __syncthreads_or(my_failure) != 0;
  if (c.shrink) {
    if (blockIdx.x == 0) {
      if (threadIdx.x == 0)
        device::store_release_gpu(counters.gate, 1u);  // the masks written above precede it (barrier)
    } else {
      if (threadIdx.x == 0) {
        // Block 0 settles within the timeout; allow it as long again before giving up.
        uint32_t gate = 0;
        const WaitResult result = device::wait_until<device::AcquireScope::kGpu, 64>(
            counters.gate, [](uint32_t value) { return value != 0; }, gate, start, 2 * c.timeout_ns, c.errors);
        if (result != WaitResult::kReady) {
          if (result == WaitResult::kTimedOut && !aborted(c))  // another block may have aborted meanwhile
            record_error(c, DeviceErrorKind::kTimeout, phase, c.rank, int64_t(c.timeout_ns));
          my_failure = 1;
        }
      }
      failed = __syncthreads_or(my_failure) != 0;
      for (int s = threadIdx.x; s < c.num_ranks; s += blockDim.x) peers.usable[s] = is_masked(c, s) ? 0 : 1;
    }
    __syncthreads();
  }
  if (failed) return false;
  // The flag reads above precede this add (barrier, then release): the block that sees the count
  // complete may clear the flags.
  if (threadIdx.x == 0) ticket = device::fetch_add_release_gpu(counters.readers, 1u);
  return true;
}

// Called by every thread at the end of a receive kernel that passed wait_for_sources (thread 0
// holds its ticket). The last block to have passed clears the flags of `set`, the gate and the
// reader count for the next call of this parity.
__device__ __forceinline__ void release_flags(const Common& c, int set, ReceiveCounters counters, uint32_t ticket) {
  if (threadIdx.x >= 32) return;
  ticket = __shfl_sync(0xffffffffu, ticket, 0);
  if (ticket != gridDim.x - 1) return;
  device::fence_acq_rel_gpu();  // acquire: every block's flag reads precede the clears
  for (int s = threadIdx.x; s < c.num_ranks; s += 32) *reinterpret_cast<volatile uint64_t*>(local_flag(c, set, s)) = 0;
  if (threadIdx.x == 0) {
    *reinterpret_cast<volatile uint32_t*>(counters.readers) = 0;
    *reinterpret_cast<volatile uint32_t*>(counters.gate) = 0;
  }
}

// Tuning experiment (built with -DEPCOMM_LL_TRACE=1): thread 0 of block 0 reads clock64() at the
// phase marks of a kernel and prints the cycles between them for every 64th call of that kernel
// (call % 64 == 30, so in the middle of the bench's timed loops). Empty otherwise.
struct PhaseTrace {
#ifdef EPCOMM_LL_TRACE
  long long marks[12];
  int count = 0;
  uint64_t start_ns = global_timer_ns();
  __device__ PhaseTrace() { mark(); }
  __device__ __forceinline__ void mark() {
    if (count < 12) marks[count++] = clock64();
  }
  __device__ void print(const char* kernel, int rank, int tokens, unsigned* calls) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const unsigned call = atomicAdd(calls, 1u);
    if (call % 64 != 30) return;
    mark();
    long long d[10] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 1; i < count && i < 11; ++i) d[i - 1] = marks[i] - marks[i - 1];
    printf(
        "[ll-trace] %s rank %d call %u T %d grid %d: cycles %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld; %llu "
        "ns\n",
        kernel, rank, call, tokens, int(gridDim.x), d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9],
        static_cast<unsigned long long>(global_timer_ns() - start_ns));
  }
#else
  __device__ __forceinline__ void mark() {}
  __device__ __forceinline__ void print(const char*, int, int, unsigned*) {}
#endif
};
#ifdef EPCOMM_LL_TRACE
static __device__ unsigned trace_calls[4];
#endif
__device__ __forceinline__ unsigned* trace_counter(int kernel) {
#ifdef EPCOMM_LL_TRACE
  return trace_calls + kernel;
#else
  (void)kernel;
  return nullptr;
#endif
}

}  // namespace epcomm::cuda::ll
