// Built instead of src/cuda/ when epcomm is compiled without CUDA.
#include "core/backend.hpp"
#include "core/check.hpp"

namespace epcomm {

Limits cuda_backend_limits() {
  Limits limits;  // available = false: nothing is accepted
  limits.backend = BackendKind::kCuda;
  return limits;
}

std::unique_ptr<Backend> make_cuda_backend(Bootstrap&, const BufferOptions&, const GroupGeometry&) {
  throw_error(ErrorCode::kUnsupported,
              "Buffer: backend: this build of epcomm has no CUDA backend (rebuild with nvcc available, "
              "or create the Buffer with BackendKind::kCpu)");
}

}  // namespace epcomm
