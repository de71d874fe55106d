// Built until the NVSHMEM low-latency mode is: a CUDA Buffer with low_latency_mode=True fails at
// construction with a clear message instead of at link time.
#include "core/check.hpp"
#include "cuda/low_latency/low_latency_mode.hpp"

namespace epcomm::cuda {

bool low_latency_mode_built() { return false; }

std::unique_ptr<LowLatencyMode> make_low_latency_mode(const CudaContext&) {
  throw_error(ErrorCode::kUnsupported,
              "Buffer: low_latency_mode: low-latency mode on GPUs is not built yet in this version of epcomm "
              "(create the Buffer with low_latency_mode=False, or use BackendKind::kCpu)");
}

}  // namespace epcomm::cuda
