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
  kBadIndex,  // topk_idx value out of [-1, E): `value` holds it, `peer` the token, `detail` = E * 32 + slot
  kCapacity,  // more rows than the output holds (num_worst_tokens): `value` = rows needed, `peer` the
              // receiving rank, `detail` = its capacity
  kMismatch,  // `peer` made a different call: `value` = its call signature, `detail` = which word differs
  kBadCount,  // a layout tensor disagrees with the routing: `peer` = entry, `value` = (given << 32) | derived,
              // `detail` = which tensor (normal mode: 0 num_tokens_per_rank, 1 ..._rdma_rank, 2 ..._expert)
  kProtocol,  // a received record is inconsistent (a bug): `peer` = the source rank, `value` what was seen
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
  int32_t abort;   // raised with the error: every waiting block gives up
  int32_t detail;  // kind-specific (see DeviceErrorKind)
};

// Where a kernel reports (DeviceErrors hands it out; device side in cuda/device/errors.cuh).
struct DeviceErrorSink {
  DeviceErrorWord* word = nullptr;  // pinned, mapped host memory
  int32_t* claim = nullptr;         // device memory: 0 = free to record an error
  int32_t* abort = nullptr;         // device memory: 1 after a timeout; every wait gives up
};

const char* to_string(DevicePhase phase);

}  // namespace epcomm::cuda
