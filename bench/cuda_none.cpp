// Built instead of the CUDA parts of the bench when epcomm has no CUDA backend (or NCCL is missing).
#include "baseline.hpp"
#include "core/check.hpp"
#include "platform.hpp"

namespace epcomm::bench {

int cuda_device_count() { return 0; }

std::unique_ptr<Platform> make_cuda_platform(Bootstrap&, int64_t) {
  throw_error(ErrorCode::kUnsupported,
              "epcomm-bench: --backend cuda: this build has no CUDA (configure with nvcc and NCCL available)");
}

std::unique_ptr<AllToAllBaseline> make_nccl_baseline(Platform&, const TensorView&, const TensorView&, int) {
  throw_error(ErrorCode::kUnsupported, "epcomm-bench: the NCCL baseline needs a build with CUDA and NCCL");
}

}  // namespace epcomm::bench
