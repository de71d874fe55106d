// Host: the one way every CUDA kernel of epcomm is launched (both modes), and the shared-memory
// opt-in of kernels that need more than the default. A failed launch throws epcomm::Error(kInternal)
// naming the call (core/cuda_check.hpp).
#pragma once

#include <cuda_runtime.h>

#include "core/cuda_check.hpp"

namespace epcomm::cuda {

// Launches `kernel` (a __global__ function taking one params struct) on `stream`; with
// `overlap_previous`, as a programmatic dependent of the kernel before it on the stream (sm_90: it may
// start while that kernel still runs; see low_latency/kernels/common.cuh).
template <class Params>
void launch_kernel(void (*kernel)(Params), int grid, int block, size_t smem, cudaStream_t stream, bool overlap_previous,
                   const Params& params) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = overlap_previous ? 1 : 0;
  EPCOMM_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params));
}

// Lets `kernel` take up to `max_block_smem` bytes of shared memory per block in total (the device's
// opt-in limit): the dynamic part may use what the kernel's static shared memory leaves.
template <class Params>
void allow_dynamic_smem(void (*kernel)(Params), int max_block_smem) {
  cudaFuncAttributes attributes = {};
  EPCOMM_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const int dynamic_bytes = max_block_smem - static_cast<int>(attributes.sharedSizeBytes);
  EPCOMM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_bytes));
}

}  // namespace epcomm::cuda
