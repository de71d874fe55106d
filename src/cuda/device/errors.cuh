// Device side of error reporting (host side: DeviceErrors in cuda/cuda_context.hpp) and the one
// bounded wait every kernel of both modes goes through (wait_until).
//
// A kernel that gives up records the FIRST error of the buffer in the host-mapped DeviceErrorWord:
// it wins an atomicCAS on `claim` (device memory), writes the fields, fences at system scope and
// sets `set` last. Only timeouts raise `abort` (device memory, polled by every wait): the other blocks
// of the call, and of any later call, stop waiting. Data errors (bad index, capacity, mismatch) do
// not abort: the kernels finish the protocol so that the peers complete and the buffer stays usable.
#pragma once

#include <cstdint>

#include "cuda/device/error_word.cuh"
#include "cuda/device/ptx.cuh"

namespace epcomm::cuda::device {

using ErrorSink = DeviceErrorSink;

__device__ __forceinline__ bool aborted(const ErrorSink& sink) { return load_volatile(sink.abort) != 0; }

static __device__ __noinline__ void report_error(const ErrorSink& sink, DeviceErrorKind kind, DevicePhase phase,
                                                 int32_t peer, int64_t value, int32_t detail = 0) {
  const bool is_timeout = kind == DeviceErrorKind::kTimeout;
  if (is_timeout) {
    atomicExch(sink.abort, 1);
    __threadfence();
  }
  if (atomicCAS(sink.claim, 0, 1) != 0) return;  // someone recorded an error first
  volatile DeviceErrorWord* word = sink.word;
  word->kind = static_cast<int32_t>(kind);
  word->phase = static_cast<int32_t>(phase);
  word->peer = peer;
  word->value = value;
  word->detail = detail;
  word->abort = is_timeout ? 1 : 0;
  __threadfence_system();
  word->set = 1;
  __threadfence_system();
}

// What a failed wait reports: the phase and the rank waited for.
struct WaitSite {
  DevicePhase phase;
  int32_t peer;
};

enum class WaitResult { kReady, kTimedOut, kAborted };

// The scope of the acquire a wait polls with: .sys for what another GPU writes, .gpu for what
// another block of this GPU writes.
enum class AcquireScope { kSys, kGpu };

template <AcquireScope kScope, class T>
__device__ __forceinline__ T load_acquire(const T* address) {
  if constexpr (kScope == AcquireScope::kSys) {
    return load_acquire_sys(address);
  } else {
    return load_acquire_gpu(address);
  }
}

// The one bounded wait of every kernel. Polls `*address` (an acquire of kScope) until done(value)
// holds, `seen` receiving each value read. Every kPollEvery polls it checks the abort flag, then the
// clock: more than timeout_ns since `start` is a timeout. Records nothing: the caller decides
// whether a timeout is an error (wait_or_report), a late rank to mask, ...
template <AcquireScope kScope, uint32_t kPollEvery, class T, class Done>
__device__ __forceinline__ WaitResult wait_until(const T* address, Done done, T& seen, uint64_t start,
                                                 uint64_t timeout_ns, const ErrorSink& sink) {
  static_assert(kPollEvery > 0, "kPollEvery: polls between two checks of the abort flag and the clock");
  uint32_t polls = 0;
  while (!done(seen = load_acquire<kScope>(address))) {
    if (++polls % kPollEvery == 0) {
      if (aborted(sink)) return WaitResult::kAborted;
      if (global_timer_ns() - start > timeout_ns) return WaitResult::kTimedOut;
    }
  }
  return WaitResult::kReady;
}

// wait_until for one thread that owns the wait (the normal-mode protocol): the clock is read only
// when the first poll fails, and a timeout is recorded naming `site`. Returns whether done(seen)
// holds; false without recording when another block aborted.
template <AcquireScope kScope = AcquireScope::kSys, uint32_t kPollEvery = 1, class T, class Done>
__device__ __forceinline__ bool wait_or_report(const T* address, Done done, T& seen, uint64_t timeout_ns,
                                               const ErrorSink& sink, WaitSite site) {
  if (done(seen = load_acquire<kScope>(address))) return true;
  const WaitResult result = wait_until<kScope, kPollEvery>(address, done, seen, global_timer_ns(), timeout_ns, sink);
  if (result == WaitResult::kTimedOut)
    report_error(sink, DeviceErrorKind::kTimeout, site.phase, site.peer, static_cast<int64_t>(timeout_ns));
  return result == WaitResult::kReady;
}

}  // namespace epcomm::cuda::device
