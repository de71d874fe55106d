#include "core/cuda_check.hpp"

#if EPCOMM_WITH_CUDA

namespace epcomm {

void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  throw_error(ErrorCode::kInternal, concat(call, " failed: ", cudaGetErrorName(status), " (",
                                           cudaGetErrorString(status), ") at ", file, ":", line));
}

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) return;
  EPCOMM_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ == device) {
    previous_ = -1;
    return;
  }
  EPCOMM_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

}  // namespace epcomm

#endif
