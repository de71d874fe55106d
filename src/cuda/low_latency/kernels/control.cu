// Small control kernels of low-latency mode (stream-ordered, so CUDA-graph capturable).
#include "cuda/device/launch.hpp"
#include "cuda/low_latency/ll_params.hpp"

namespace epcomm::cuda::ll {
namespace {

struct MaskUpdate {
  int32_t* mask;
  int rank;
  int value;
};

__global__ void set_mask_kernel(const __grid_constant__ MaskUpdate update) { update.mask[update.rank] = update.value; }

}  // namespace

void launch_set_mask(int32_t* mask, int rank, int value, cudaStream_t stream) {
  launch_kernel(set_mask_kernel, 1, 1, 0, stream, /*overlap_previous=*/false, MaskUpdate{mask, rank, value});
}

}  // namespace epcomm::cuda::ll
