// Pieces every normal-mode kernel shares: entering and leaving a call (the entry barrier and the
// device-side call counter), warp-wide copies, and small warp algorithms.
#pragma once

#include <cstdint>

#include "cuda/device/errors.cuh"
#include "cuda/device/ptx.cuh"
#include "cuda/normal/params.hpp"

namespace epcomm::cuda::kernels {

using device::ErrorSink;
using device::WaitSite;

constexpr int kWarpSize = 32;

// 16-byte vectors in flight per lane in a record copy (a build option, so that it can be measured).
#ifndef EPCOMM_NORMAL_COPY_UNROLL
#define EPCOMM_NORMAL_COPY_UNROLL 8
#endif
constexpr int kCopyUnroll = EPCOMM_NORMAL_COPY_UNROLL;
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
    const bool arrived = device::wait_until([&] { return device::load_acquire_sys(&theirs->epoch) >= epoch; },
                                            c.timeout_ns, c.errors, WaitSite{phase, tid});
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
