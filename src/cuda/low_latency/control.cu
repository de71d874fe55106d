// Small control kernels of low-latency mode (stream-ordered, so CUDA-graph capturable).
#include "core/cuda_check.hpp"
#include "cuda/low_latency/ll_params.hpp"

namespace epcomm::cuda::ll {
namespace {

__global__ void set_mask_kernel(int32_t* mask, int rank, int value) { mask[rank] = value; }

}  // namespace

void launch_set_mask(int32_t* mask, int rank, int value, cudaStream_t stream) {
  set_mask_kernel<<<1, 1, 0, stream>>>(mask, rank, value);
  EPCOMM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace epcomm::cuda::ll
