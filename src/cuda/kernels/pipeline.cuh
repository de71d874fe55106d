// Shared-memory stages filled and drained by bulk copies (TMA), for the dispatch and combine kernels.
//
// A stage k has two mbarriers: `full[k]` completes a phase when the stage holds its data (bulk loads
// landed, plus one arrival of whoever wrote the rest), `empty[k]` when its consumers are done with it.
// Use n of stage k (n = 0, 1, ...) is phase n of both: consumers wait full phase n, the producer waits
// empty phase n - 1 before the next fill. One fixed worker serves every use of a stage in order (the
// parity rule, device/ptx.cuh), so a sequence number s of a worker's round-robin maps to stage
// s % stages and use s / stages.
//
// Every wait here is bounded like any other (the buffer's timeout, the abort flag): a producer that
// gave up never fills its stage, so the consumers must give up too instead of hanging.
#pragma once

#include <cstdint>

#include "cuda/kernels/common.cuh"

namespace epcomm::cuda::kernels {

struct StageBarriers {
  uint64_t full[kMaxStages];
  uint64_t empty[kMaxStages];
  uint32_t armed[kMaxStages];  // phases started on full[k] (for the drain at exit)
};

// Thread 0 of the block; the caller then synchronises the block.
__device__ __forceinline__ void init_stage_barriers(StageBarriers& b, uint32_t full_arrivals, uint32_t empty_arrivals) {
  for (int k = 0; k < kMaxStages; ++k) {
    device::mbarrier_init(&b.full[k], full_arrivals);
    device::mbarrier_init(&b.empty[k], empty_arrivals);
    b.armed[k] = 0;
  }
  device::fence_mbarrier_init();
}

__device__ __forceinline__ uint32_t use_parity(uint32_t sequence, uint32_t stages) { return (sequence / stages) & 1u; }

// One thread waits for the phase of parity `parity` of a local barrier. False when it timed out (recorded,
// naming `site`) or another block aborted. Local waits allow twice the timeout: what they wait for
// is a worker of this block, which gives up (and raises the abort flag) on its own timeout first when
// it waits for a peer, so a timeout names the peer, not this rank.
// try_wait suspends the thread until the phase completes or a hardware time limit passes, so the
// loop wakes as soon as the phase completes; the abort flag (a load from device memory) and the clock
// are only looked at every kChecksEvery rounds, so as not to add their latency to the wake-up.
static __device__ __noinline__ bool wait_phase(uint64_t* barrier, uint32_t parity, const NormalCommon& c, WaitSite site) {
  constexpr uint32_t kChecksEvery = 8;
  if (device::mbarrier_try_wait(barrier, parity)) return true;
  const uint64_t start = device::global_timer_ns();
  for (uint32_t round = 1;; ++round) {
    if (device::mbarrier_try_wait(barrier, parity)) return true;
    if (round % kChecksEvery != 0) continue;
    if (device::aborted(c.errors)) return false;
    if (device::global_timer_ns() - start > 2 * c.timeout_ns) {
      device::report_error(c.errors, DeviceErrorKind::kTimeout, site.phase, site.peer,
                           static_cast<int64_t>(c.timeout_ns));
      return false;
    }
  }
}

// The whole warp waits: lane 0 spins (bounded), then every lane observes the completed phase itself,
// so that every lane's later reads of the stage are ordered after the data landed.
__device__ __forceinline__ bool warp_wait_phase(uint64_t* barrier, uint32_t parity, const NormalCommon& c,
                                                WaitSite site, int lane) {
  bool ok = true;
  if (lane == 0) ok = wait_phase(barrier, parity, c, site);
  ok = __shfl_sync(~0u, ok, 0);
  if (ok) (void)device::mbarrier_try_wait(barrier, parity);  // completed: returns true at once
  return ok;
}

// Whether another block gave up (read by lane 0, the same answer on every lane).
__device__ __forceinline__ bool warp_aborted(const NormalCommon& c) {
  return __shfl_sync(~0u, static_cast<int>(device::aborted(c.errors)), 0) != 0;
}

// Bounds a warp-uniform polling loop. progress() whenever the loop saw something new; idle() after
// a round that saw nothing: kStop once another block aborted or nothing came for the timeout (the
// flag and the clock are looked at every few idle rounds only), else kGoOn. Same answer on every lane.
class IdleClock {
 public:
  enum Verdict { kGoOn, kAborted, kTimedOut };
  __device__ void progress() {
    since_ = 0;
    rounds_ = 0;
  }
  __device__ Verdict idle(const NormalCommon& c) {
    if (++rounds_ % 8 != 0) return kGoOn;
    if (warp_aborted(c)) return kAborted;
    const uint64_t now = __shfl_sync(~0u, device::global_timer_ns(), 0);
    if (since_ == 0) {
      since_ = now;
      return kGoOn;
    }
    return now - since_ > c.timeout_ns ? kTimedOut : kGoOn;
  }

 private:
  uint64_t since_ = 0;
  uint32_t rounds_ = 0;
};

// Thread 0, after the block synchronised at its end: the block must not exit while a bulk load it
// started may still write its shared memory. On a normal run every started phase completed already;
// after a timeout some loads may have had no consumer, and they land within microseconds. Bounded and
// silent (the error that stopped the run is recorded already).
__device__ __forceinline__ void drain_stages(StageBarriers& b, uint64_t timeout_ns) {
  for (int k = 0; k < kMaxStages; ++k) {
    if (b.armed[k] == 0) continue;
    const uint32_t parity = (b.armed[k] - 1) & 1u;
    const uint64_t start = device::global_timer_ns();
    while (!device::mbarrier_try_wait(&b.full[k], parity) && device::global_timer_ns() - start < timeout_ns) {
    }
  }
}

}  // namespace epcomm::cuda::kernels
