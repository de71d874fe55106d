// CUDA runtime error checks for host code: a failed call becomes epcomm::Error(kInternal) naming
// the call, never an exit(). Empty when epcomm is built without CUDA.
#pragma once

#if EPCOMM_WITH_CUDA
#include <cuda_runtime.h>

#include "core/check.hpp"

namespace epcomm {

[[noreturn]] void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line);

// Makes `device` current for the lifetime of the guard (no-op for a negative index).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace epcomm

#define EPCOMM_CUDA_CHECK(call)                                                                               \
  do {                                                                                                        \
    cudaError_t epcomm_status_ = (call);                                                                      \
    if (epcomm_status_ != cudaSuccess) ::epcomm::throw_cuda_error(epcomm_status_, #call, __FILE__, __LINE__); \
  } while (0)

#endif  // EPCOMM_WITH_CUDA
