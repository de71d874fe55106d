// Small control kernels of low-latency mode (stream-ordered, so CUDA-graph capturable).
#include "cuda/low_latency/ll_params.hpp"

namespace epcomm::cuda::ll {
namespace {

__global__ void set_mask_kernel(int32_t* mask, int rank, int value) { mask[rank] = value; }

}  // namespace

void launch_set_mask(int32_t* mask, int rank, int value, cudaStream_t stream) {
  set_mask_kernel<<<1, 1, 0, stream>>>(mask, rank, value);
  launch_check(cudaGetLastError(), "set_mask_kernel");
}

}  // namespace epcomm::cuda::ll
