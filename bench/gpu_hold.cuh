// A kernel that keeps the GPU busy for a fixed time, queued just before a timed call: the host then
// has queued the call (and its stop event) before the GPU reaches the start event, so CUDA events
// time the GPU's work, not the host's launch path.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace epcomm::bench {

void launch_gpu_hold(uint32_t nanoseconds, cudaStream_t stream);

}  // namespace epcomm::bench
