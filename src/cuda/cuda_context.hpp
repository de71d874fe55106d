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
class DeviceErrors {
 public:
  DeviceErrors();
  ~DeviceErrors();
  DeviceErrors(const DeviceErrors&) = delete;
  DeviceErrors& operator=(const DeviceErrors&) = delete;

  DeviceErrorWord* device_word() const { return word_; }
  // Throws the recorded error, if any, as epcomm::Error (and clears it). Cheap: reads host memory.
  void throw_if_set();
  bool is_set() const;

 private:
  DeviceErrorWord* word_ = nullptr;
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
