// Pieces every normal-mode kernel shares: entering and leaving a call (the entry barrier and the
// device-side call counter), the warp groups and the queue sender of dispatch and combine, warp-wide
// copies, and small warp algorithms. Memory operations: cuda/device/ptx.cuh.
#pragma once

#include <cstdint>

#include "cuda/device/errors.cuh"
#include "cuda/device/ptx.cuh"
#include "cuda/normal/params.hpp"

namespace epcomm::cuda::kernels {

using device::ErrorSink;
using device::kCopyUnroll;
using device::WaitSite;

constexpr int kWarpSize = 32;
// 16-byte vectors per lane a combine receiver reduces at a time (each needs one load per sender).
#ifndef EPCOMM_NORMAL_REDUCE_UNROLL
#define EPCOMM_NORMAL_REDUCE_UNROLL 2
#endif
constexpr int kReduceUnroll = EPCOMM_NORMAL_REDUCE_UNROLL;

template <class T>
__device__ __forceinline__ T* at_offset(char* base, int64_t offset) {
  return reinterpret_cast<T*>(base + offset);
}
template <class T>
__device__ __forceinline__ const T* at_offset(const char* base, int64_t offset) {
  return reinterpret_cast<const T*>(base + offset);
}

__device__ __forceinline__ uint64_t read_epoch(const LocalState* state) {
  return *reinterpret_cast<const volatile uint64_t*>(&state->epoch);
}

// The epoch of the dispatch that made a handle ([R] and [R + 1] of its meta tensor).
__device__ __forceinline__ uint64_t handle_epoch(const int32_t* meta, int num_ranks) {
  return uint64_t(uint32_t(meta[num_ranks])) | uint64_t(uint32_t(meta[num_ranks + 1])) << 32;
}

// The entry barrier of a call made of one kernel (cached dispatch, combine), run by every block:
// announces this rank's call record to every peer, waits for every peer's, and compares them. Every
// block reaches the same verdict, so on a mismatch the whole group skips the data phase
// consistently. Returns whether to proceed; `epoch` receives the call's number.
__device__ __forceinline__ bool enter_call(const NormalCommon& c, uint64_t signature, uint64_t handle_epoch,
                                           DevicePhase phase, uint64_t& epoch) {
  __shared__ int stop;
  const int tid = threadIdx.x;
  epoch = read_epoch(c.state) + 1;  // every block reads it before the last block advances it
  const int parity = static_cast<int>(epoch & 1);
  const uint64_t geometry = queue_signature(c.queues.num_channels, c.queues.queue_tokens);
  if (tid == 0) stop = 0;
  __syncthreads();
  if (tid < c.num_ranks) {
    // Our record in peer `tid` (every block writes the same values).
    auto* ours = at_offset<CallRecord>(c.peers[tid], call_record_offset(parity, c.rank));
    ours->signature = signature;
    ours->geometry = geometry;
    ours->handle_epoch = handle_epoch;
    device::store_release_sys(&ours->epoch, epoch);
    // Peer `tid`'s record in our memory.
    const auto* theirs = at_offset<const CallRecord>(c.peers[c.rank], call_record_offset(parity, tid));
    uint64_t seen = 0;
    const bool arrived = device::wait_or_report(
        &theirs->epoch, [&](uint64_t value) { return value >= epoch; }, seen, c.timeout_ns, c.errors,
        WaitSite{phase, tid});
    if (!arrived) {
      atomicOr(&stop, 1);
    } else {
      const uint64_t their_signature = __ldcg(reinterpret_cast<const unsigned long long*>(&theirs->signature));
      const uint64_t their_geometry = __ldcg(reinterpret_cast<const unsigned long long*>(&theirs->geometry));
      const uint64_t their_handle = __ldcg(reinterpret_cast<const unsigned long long*>(&theirs->handle_epoch));
      const int differs = their_signature != signature   ? 1
                          : their_handle != handle_epoch ? 2
                          : their_geometry != geometry   ? 3
                                                         : 0;
      if (differs != 0) {
        if (blockIdx.x == 0) {
          device::report_error(c.errors, DeviceErrorKind::kMismatch, phase, tid,
                               static_cast<int64_t>(differs == 1   ? their_signature
                                                    : differs == 2 ? their_handle
                                                                   : their_geometry),
                               differs - 1);
        }
        atomicOr(&stop, 1);
      }
    }
  }
  __syncthreads();
  return stop == 0;
}

// The end of a one-kernel call: the last block to finish advances this rank's call counter, so the
// next call (next kernel on the stream) sees it.
__device__ __forceinline__ void finish_call(const NormalCommon& c, uint64_t epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&c.state->blocks_done, 1u) == gridDim.x - 1) {
      c.state->blocks_done = 0;
      *reinterpret_cast<volatile uint64_t*>(&c.state->epoch) = epoch;
      __threadfence();
    }
  }
}

// The warps of a dispatch or combine block split into one group per peer rank (leftover warps idle).
struct WarpGroup {
  int peer;       // destination (sender) or source (receiver); >= R for idle warps
  int index;      // warp index inside the group
  int num_warps;  // W
  int lane;
  __device__ bool leader() const { return index == 0 && lane == 0; }
  __device__ void sync() const { device::named_barrier(1 + peer, num_warps * kWarpSize); }
};

__device__ __forceinline__ WarpGroup make_group(int num_ranks) {
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = (blockDim.x / kWarpSize) / num_ranks;
  return WarpGroup{warp / num_warps, warp % num_warps, num_warps, static_cast<int>(threadIdx.x % kWarpSize)};
}

// The sending side of one queue (this rank, channel) in the destination's memory, as dispatch and
// combine drive it: records 0, 1, ... in order, record j written by warp j % W of the group. Every
// chunk_tokens records the group meets at its named barrier and the leader publishes the tail
// (release); a warp waits for ring space by polling the head the receiver writes into OUR memory
// (acquire). finish() publishes the count with the done bit. Every warp of the group calls claim()
// for every record, in order (the publications are group barriers).
struct QueueSender {
  const NormalCommon& c;
  const WarpGroup& g;
  uint64_t epoch;
  DevicePhase phase;
  char* queue;                           // slot 0 of the queue, in the destination's memory
  uint64_t* tail;                        // in the destination's memory
  const uint64_t* head;                  // in ours
  uint32_t published = 0, consumed = 0;  // records published; records the receiver freed (as last seen)
  bool alive = true;                     // false once a wait gave up: this warp writes nothing more

  __device__ QueueSender(const NormalCommon& common, const WarpGroup& group, int channel, uint64_t call_epoch,
                         DevicePhase call_phase)
      : c(common),
        g(group),
        epoch(call_epoch),
        phase(call_phase),
        queue(common.peers[group.peer] + common.queues.queue_offset(common.rank, channel)),
        tail(at_offset<uint64_t>(common.peers[group.peer], tail_offset(common.rank, channel))),
        head(at_offset<const uint64_t>(common.peers[common.rank], head_offset(group.peer, channel))) {}

  // The slot of record `next` when this warp writes it (its ring space is free), else null.
  __device__ __forceinline__ char* claim(uint32_t next) {
    const uint32_t Q = static_cast<uint32_t>(c.queues.queue_tokens);
    if (next - published >= static_cast<uint32_t>(c.chunk_tokens)) {
      publish(next, false);
      published = next;
    }
    if (static_cast<int>(next % g.num_warps) != g.index || !alive) return nullptr;
    if (next >= consumed + Q) {  // wait until the receiver freed the slot
      uint64_t seen = 0;
      bool ok = true;
      if (g.lane == 0)
        ok = device::wait_or_report(
            head, [&](uint64_t value) { return next < count_of(value, epoch) + Q; }, seen, c.timeout_ns, c.errors,
            WaitSite{phase, g.peer});
      alive = __shfl_sync(~0u, ok, 0);
      consumed = __shfl_sync(~0u, g.lane == 0 ? count_of(seen, epoch) : consumed, 0);
      __syncwarp();
      if (!alive) return nullptr;
    }
    return queue + int64_t(next % Q) * c.queues.record_bytes;
  }

  // The last publication: `count` records, done.
  __device__ __forceinline__ void finish(uint32_t count) { publish(count, true); }

 private:
  __device__ __forceinline__ void publish(uint32_t count, bool done) {
    g.sync();  // every record below `count` is written
    if (g.leader() && !device::aborted(c.errors)) device::store_release_sys(tail, pack_tail(epoch, count, done));
  }
};

// Runs `send(sender)` in the warps of this warp's group, on the queue of its destination
// (sender.g.peer) for `channel`; leftover warps return at once.
template <class Send>
__device__ __forceinline__ void send_channel(const NormalCommon& c, int channel, uint64_t epoch, DevicePhase phase,
                                             Send send) {
  const WarpGroup g = make_group(c.num_ranks);
  if (g.peer >= c.num_ranks) return;
  QueueSender sender(c, g, channel, epoch, phase);
  send(sender);
}

// Warp-wide copy of `num_vectors` 16-byte vectors, kUnroll loads in flight per lane before their
// stores (lane l moves vectors l, l + 32, ...; one base address per lane, immediate offsets).
// kFromQueue: the source is a queue slot a peer wrote (read from L2, never L1); otherwise it is an
// input of the call, read once through the non-coherent path.
template <int kUnroll, bool kFromQueue>
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int num_vectors, int lane) {
  src += lane * 16;
  dst += lane * 16;
  for (int remaining = num_vectors - lane; remaining > 0; remaining -= kUnroll * kWarpSize) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (u * kWarpSize < remaining)
        v[u] = kFromQueue ? device::load_cg_16(src + u * kWarpSize * 16) : device::load_nc_16(src + u * kWarpSize * 16);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (u * kWarpSize < remaining) device::store_16(dst + u * kWarpSize * 16, v[u]);
    src += kUnroll * kWarpSize * 16;
    dst += kUnroll * kWarpSize * 16;
  }
}

template <int kUnroll>
__device__ __forceinline__ void warp_copy_from_input(char* dst, const char* src, int num_vectors, int lane) {
  warp_copy<kUnroll, false>(dst, src, num_vectors, lane);
}

template <int kUnroll>
__device__ __forceinline__ void warp_copy_from_queue(char* dst, const char* src, int num_vectors, int lane) {
  warp_copy<kUnroll, true>(dst, src, num_vectors, lane);
}

// First index i in [lo, hi) with sorted[i] >= key, or hi; the whole warp calls it. 32 probes per
// step, so a few dependent loads for any realistic length.
__device__ __forceinline__ int warp_lower_bound(const int32_t* sorted, int lo, int hi, int key, int lane) {
  while (hi - lo > kWarpSize) {
    const int step = (hi - lo + kWarpSize - 1) / kWarpSize;
    const int probe = lo + lane * step;
    const bool at_or_after = probe >= hi || sorted[probe] >= key;
    const uint32_t ballot = __ballot_sync(~0u, at_or_after);
    if (ballot == 0) {
      lo = lo + (kWarpSize - 1) * step + 1;
      continue;
    }
    const int first = __ffs(ballot) - 1;
    const int new_lo = first == 0 ? lo : lo + (first - 1) * step + 1;
    hi = min(hi, lo + first * step);
    lo = new_lo;
  }
  const int probe = lo + lane;
  const uint32_t ballot = __ballot_sync(~0u, probe < hi && sorted[probe] >= key);
  return ballot != 0 ? lo + __ffs(ballot) - 1 : hi;
}

// topk_idx[t, k] of a contiguous [T, K] int64 or int32 tensor.
__device__ __forceinline__ int64_t load_topk(const void* topk_idx, bool is_int64, int64_t index) {
  return is_int64 ? __ldg(static_cast<const long long*>(topk_idx) + index)
                  : static_cast<int64_t>(__ldg(static_cast<const int*>(topk_idx) + index));
}

}  // namespace epcomm::cuda::kernels
