#include "epcomm/event.hpp"

#include "core/check.hpp"
#include "core/cuda_check.hpp"
#include "epcomm/ops.hpp"

namespace epcomm {

#if EPCOMM_WITH_CUDA
struct Event::Impl {
  cudaEvent_t event = nullptr;
  ~Impl() {
    if (event != nullptr) cudaEventDestroy(event);
  }
};

Event Event::record(StreamHandle stream) {
  Event result;
  result.impl_ = std::make_shared<Impl>();
  EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&result.impl_->event, cudaEventDisableTiming));
  EPCOMM_CUDA_CHECK(cudaEventRecord(result.impl_->event, stream));
  return result;
}

void Event::wait(StreamHandle stream) const {
  if (impl_) EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(stream, impl_->event, 0));
}

void Event::synchronize() const {
  if (impl_) EPCOMM_CUDA_CHECK(cudaEventSynchronize(impl_->event));
}

bool Event::query() const {
  if (!impl_) return true;
  const cudaError_t status = cudaEventQuery(impl_->event);
  if (status == cudaErrorNotReady) return false;
  EPCOMM_CUDA_CHECK(status);
  return true;
}

CUevent_st* Event::native() const { return impl_ ? impl_->event : nullptr; }
#else
struct Event::Impl {};

Event Event::record(StreamHandle) {
  throw_error(ErrorCode::kUnsupported, "Event::record: this build of epcomm has no CUDA");
}
void Event::wait(StreamHandle) const {}
void Event::synchronize() const {}
bool Event::query() const { return true; }
CUevent_st* Event::native() const { return nullptr; }
#endif

void RecvHook::operator()(StreamHandle stream) {
  if (!run_)
    throw_error(ErrorCode::kInvalidArgument,
                "recv hook: empty (the call did not ask for return_recv_hook, or the hook already ran)");
  auto run = std::move(run_);
  run_ = nullptr;
  run(stream);
}

}  // namespace epcomm
