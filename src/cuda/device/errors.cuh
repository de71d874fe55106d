// Device side of error reporting (host side: DeviceErrors in cuda/cuda_context.hpp) and the one
// bounded spin every wait goes through.
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

// Spins until ready() holds, for at most timeout_ns. Returns false (after recording a timeout that
// names `site`) when the time runs out, and false without recording when another block aborted.
// Called by one thread; ready() does the acquire load.
template <class Ready>
__device__ __forceinline__ bool wait_until(Ready ready, uint64_t timeout_ns, const ErrorSink& sink, WaitSite site) {
  if (ready()) return true;
  const uint64_t start = global_timer_ns();
  while (true) {
    if (ready()) return true;
    if (aborted(sink)) return false;
    if (global_timer_ns() - start > timeout_ns) {
      report_error(sink, DeviceErrorKind::kTimeout, site.phase, site.peer, static_cast<int64_t>(timeout_ns));
      return false;
    }
  }
}

}  // namespace epcomm::cuda::device
