// The error record a kernel writes when it gives up, read by the host (cuda/cuda_context.hpp).
// Kernels never trap: they record the first error, raise `abort` so that the other blocks of the
// call stop waiting too, and return.
#pragma once

#include <cstdint>

namespace epcomm::cuda {

enum class DevicePhase : int32_t {
  kNone = 0,
  kLayout,
  kNotify,  // count exchange of a fresh dispatch
  kDispatchSend,
  kDispatchRecv,
  kCombineSend,
  kCombineRecv,
  kLowLatencyDispatchSend,
  kLowLatencyDispatchRecv,
  kLowLatencyCombineSend,
  kLowLatencyCombineRecv,
  kBarrier,
};

enum class DeviceErrorKind : int32_t {
  kNone = 0,
  kTimeout,   // waited too long for `peer`
  kBadIndex,  // topk_idx value out of [-1, E): `value` holds it, `peer` the token index
  kCapacity,  // more rows than the output holds (num_worst_tokens): `value` = rows needed
};

// Lives in pinned, mapped host memory. PCIe hosts have no native atomics on host memory, so the
// first error is claimed with an atomicCAS on a flag in device memory (`claim`); the winner writes
// the fields with plain stores, __threadfence_system(), then `set`.
struct DeviceErrorWord {
  int32_t set;    // 0 until the first error; written last, after a system fence
  int32_t kind;   // DeviceErrorKind
  int32_t phase;  // DevicePhase
  int32_t peer;   // the rank waited for (or token index)
  int64_t value;
  int32_t abort;  // raised with the error: every waiting block gives up
  int32_t pad;
};

const char* to_string(DevicePhase phase);

}  // namespace epcomm::cuda
