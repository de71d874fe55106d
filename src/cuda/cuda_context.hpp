// What every part of the CUDA backend shares: the group, the device, the communication stream,
// the timeout and the channel through which kernels report errors to the host.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <string>

#include "core/backend.hpp"
#include "cuda/device/error_word.cuh"

namespace epcomm::cuda {

// Host side of the error word kernels write (pinned, mapped memory). A kernel that gives up
// (timeout, bad index, capacity) records the first error here and returns; the host turns it into
// epcomm::Error at its next check.
//
// A timeout is sticky: the group's protocol state is lost, so every later check throws it again
// (only destroy() is guaranteed to work). Any other error is cleared when thrown: the kernels that
// record it still complete their protocol, so the buffer stays usable.
class DeviceErrors {
 public:
  // `reset_stream`: where the device-side claim flag is re-armed after a cleared error (the stream
  // all of this buffer's kernels run on, so the reset is ordered after them).
  explicit DeviceErrors(cudaStream_t reset_stream);
  ~DeviceErrors();
  DeviceErrors(const DeviceErrors&) = delete;
  DeviceErrors& operator=(const DeviceErrors&) = delete;

  // What kernels receive to report errors (cuda/device/errors.cuh).
  DeviceErrorSink sink() const { return {device_word_, flags_, flags_ + 1}; }
  // Throws the recorded error, if any, as epcomm::Error (and clears it unless it is a timeout).
  // Cheap: reads host memory.
  void throw_if_set();
  bool is_set() const;
  bool is_timeout() const;

 private:
  DeviceErrorWord* word_ = nullptr;         // host address
  DeviceErrorWord* device_word_ = nullptr;  // the same memory as the device sees it
  int32_t* flags_ = nullptr;                // device memory: [0] claim, [1] abort
  cudaStream_t reset_stream_ = nullptr;
};

struct CudaContext {
  GroupGeometry geometry;
  Bootstrap* bootstrap = nullptr;  // valid during construction and collective destroy only
  const BufferOptions* options = nullptr;
  int device = 0;
  int num_device_sms = 0;
  cudaStream_t comm_stream = nullptr;
  std::chrono::milliseconds timeout{0};
  DeviceErrors* errors = nullptr;

  Device tensor_device() const { return Device::cuda(device); }
  uint64_t timeout_ns() const { return static_cast<uint64_t>(timeout.count()) * 1000000ull; }
};

}  // namespace epcomm::cuda
