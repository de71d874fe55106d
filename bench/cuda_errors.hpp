// Error checks of the bench's CUDA and NCCL host calls: a failure becomes epcomm::Error(kInternal)
// naming the call. Kept free of other headers so that .cu files can include it.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

namespace epcomm::bench {

void check_cuda(cudaError_t status, const char* call);
void check_nccl(ncclResult_t status, const char* call);

}  // namespace epcomm::bench
