// Host entry points of the normal-mode kernels (defined in src/cuda/normal/kernels/*.cu). Each launches one
// kernel on `stream` and throws epcomm::Error(kInternal) if the launch fails.
#pragma once

#include <cuda_runtime.h>

#include "cuda/normal/params.hpp"

namespace epcomm::cuda {

// Threads per block of each kernel, for the host's sizing decisions.
constexpr int kRoutingThreads = 256;
constexpr int kNotifyThreads = 256;
constexpr int kDispatchThreads = 512;
constexpr int kCombineThreads = 512;

// Token analysis on `num_blocks` blocks (block b covers channel_tokens(T, num_blocks, b)).
void launch_routing(const RoutingParams& params, int num_blocks, cudaStream_t stream);
// Count exchange of a fresh dispatch: one block.
void launch_notify(const NotifyParams& params, cudaStream_t stream);
// 2 x C blocks.
void launch_dispatch(const DispatchParams& params, cudaStream_t stream);
void launch_combine(const CombineParams& params, cudaStream_t stream);

}  // namespace epcomm::cuda
