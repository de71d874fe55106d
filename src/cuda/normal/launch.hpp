// Host entry points of the normal-mode kernels (defined in src/cuda/kernels/*.cu). Each launches one
// kernel on `stream` and throws epcomm::Error(kInternal) if the launch fails.
#pragma once

#include <cuda_runtime.h>

#include "cuda/normal/params.hpp"

namespace epcomm::cuda {

// Threads per block of each kernel, for the host's sizing decisions.
constexpr int kRoutingThreads = 256;
constexpr int kNotifyThreads = 256;
constexpr int kDispatchThreads = kNormalWarps * 32;
constexpr int kCombineThreads = kNormalWarps * 32;

// Let the dispatch / combine kernel use all the shared memory a block may have on the current device
// (`max_shared_bytes`: cudaDevAttrMaxSharedMemoryPerBlockOptin); returns the dynamic shared memory it
// can be launched with (the rest is its static shared memory). Once per device, before any launch.
int prepare_dispatch_kernel(int max_shared_bytes);
int prepare_combine_kernel(int max_shared_bytes);

// Token analysis on `num_blocks` blocks (block b covers channel_tokens(T, num_blocks, b)).
void launch_routing(const RoutingParams& params, int num_blocks, cudaStream_t stream);
// Count exchange of a fresh dispatch: one block.
void launch_notify(const NotifyParams& params, cudaStream_t stream);
// 2 x C blocks, params.pipeline.smem_bytes of dynamic shared memory each.
void launch_dispatch(const DispatchParams& params, cudaStream_t stream);
void launch_combine(const CombineParams& params, cudaStream_t stream);

}  // namespace epcomm::cuda
