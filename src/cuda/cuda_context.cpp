#include "cuda/cuda_context.hpp"

#include <cstring>

#include "core/check.hpp"
#include "core/cuda_check.hpp"

namespace epcomm::cuda {

const char* to_string(DevicePhase phase) {
  switch (phase) {
    case DevicePhase::kNone:
      return "none";
    case DevicePhase::kLayout:
      return "layout";
    case DevicePhase::kNotify:
      return "notify";
    case DevicePhase::kDispatchSend:
      return "dispatch send";
    case DevicePhase::kDispatchRecv:
      return "dispatch receive";
    case DevicePhase::kCombineSend:
      return "combine send";
    case DevicePhase::kCombineRecv:
      return "combine receive";
    case DevicePhase::kLowLatencyDispatchSend:
      return "low-latency dispatch send";
    case DevicePhase::kLowLatencyDispatchRecv:
      return "low-latency dispatch receive";
    case DevicePhase::kLowLatencyCombineSend:
      return "low-latency combine send";
    case DevicePhase::kLowLatencyCombineRecv:
      return "low-latency combine receive";
    case DevicePhase::kBarrier:
      return "barrier";
  }
  return "unknown";
}

namespace {

// The public operation a phase belongs to, for messages.
const char* operation_of(DevicePhase phase) {
  switch (phase) {
    case DevicePhase::kLayout:
      return "get_dispatch_layout";
    case DevicePhase::kNotify:
    case DevicePhase::kDispatchSend:
    case DevicePhase::kDispatchRecv:
      return "dispatch";
    case DevicePhase::kCombineSend:
    case DevicePhase::kCombineRecv:
      return "combine";
    case DevicePhase::kLowLatencyDispatchSend:
    case DevicePhase::kLowLatencyDispatchRecv:
      return "low_latency_dispatch";
    case DevicePhase::kLowLatencyCombineSend:
    case DevicePhase::kLowLatencyCombineRecv:
      return "low_latency_combine";
    default:
      return "epcomm";
  }
}

const char* kind_name(uint64_t kind) {
  switch (kind) {
    case 1:
      return "dispatch";
    case 2:
      return "cached dispatch";
    case 3:
      return "combine";
    default:
      return "an unknown call";
  }
}

// Decodes cuda::call_signature (normal/protocol.hpp) for a mismatch message.
std::string describe_signature(uint64_t s) {
  return concat(kind_name(s & 0xF), " with ", (s >> 12) & 0x3FFFFFF, "-byte rows, ", (s >> 4) & 1 ? "fp8" : "bf16",
                ", K = ", (s >> 6) & 0x3F, (s >> 5) & 1 ? " with" : " without", " weights, ", (s >> 38) & 0x3FFF,
                " scales", (s >> 52) != 0 ? ", or a rank rejected a call that its peers made" : "");
}

const char* count_tensor_name(int32_t which) {
  switch (which) {
    case 0:
      return "num_tokens_per_rank";
    case 1:
      return "num_tokens_per_rdma_rank";
    default:
      return "num_tokens_per_expert";
  }
}

Error to_error(const DeviceErrorWord& w) {
  const auto phase = static_cast<DevicePhase>(w.phase);
  const char* op = operation_of(phase);
  switch (static_cast<DeviceErrorKind>(w.kind)) {
    case DeviceErrorKind::kTimeout:
      return Error(ErrorCode::kTimeout, concat(op, ": timed out in phase ", to_string(phase), " waiting for rank ",
                                               w.peer, " (timeout ", w.value / 1000000, " ms)"));
    case DeviceErrorKind::kBadIndex:
      return Error(ErrorCode::kInvalidArgument, concat(op, ": topk_idx: value ", w.value, " at [", w.peer, ", ",
                                                       w.detail % 32, "] is outside [-1, ", w.detail / 32, ")"));
    case DeviceErrorKind::kCapacity:
      return Error(ErrorCode::kOutOfCapacity, concat(op, ": num_worst_tokens: rank ", w.peer, " receives ", w.value,
                                                     " tokens, more than its num_worst_tokens = ", w.detail));
    case DeviceErrorKind::kMismatch:
      return Error(ErrorCode::kInvalidArgument,
                   w.detail == 0
                       ? concat(op, ": rank ", w.peer, " made a different call (", describe_signature(w.value),
                                "); every rank must make the same calls with the same hidden size, dtype and top-k")
                       : concat(op, ": rank ", w.peer,
                                " passed the handle of a different dispatch; every rank must pass the handle of the "
                                "same dispatch"));
    case DeviceErrorKind::kBadCount: {
      const int64_t given = w.value >> 32;
      const int64_t derived = static_cast<int32_t>(w.value & 0xFFFFFFFF);
      return Error(
          ErrorCode::kInvalidArgument,
          concat(op, ": ", count_tensor_name(w.detail), ": entry ", w.peer, " is ", given, " but the routing gives ",
                 derived, " (pass the tensors get_dispatch_layout returned for this routing)"));
    }
    case DeviceErrorKind::kProtocol:
      return Error(ErrorCode::kInternal,
                   concat(op, ": inconsistent record from rank ", w.peer, " in phase ", to_string(phase), " (value ",
                          w.value, ", detail ", w.detail, "); this is a bug in epcomm"));
    default:
      return Error(ErrorCode::kInternal, concat(op, ": unknown device error kind ", w.kind));
  }
}

}  // namespace

DeviceErrors::DeviceErrors(cudaStream_t reset_stream) : reset_stream_(reset_stream) {
  EPCOMM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&word_), sizeof(DeviceErrorWord), cudaHostAllocMapped));
  std::memset(static_cast<void*>(word_), 0, sizeof(DeviceErrorWord));
  try {
    EPCOMM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_word_), word_, 0));
    EPCOMM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&flags_), 2 * sizeof(int32_t)));
    EPCOMM_CUDA_CHECK(cudaMemset(flags_, 0, 2 * sizeof(int32_t)));
    EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    if (flags_ != nullptr) cudaFree(flags_);
    cudaFreeHost(word_);
    throw;
  }
}

DeviceErrors::~DeviceErrors() {
  if (flags_ != nullptr) cudaFree(flags_);
  if (word_ != nullptr) cudaFreeHost(word_);
}

bool DeviceErrors::is_set() const { return reinterpret_cast<const volatile DeviceErrorWord*>(word_)->set != 0; }

bool DeviceErrors::is_timeout() const {
  const volatile DeviceErrorWord* w = word_;
  return w->set != 0 && w->kind == static_cast<int32_t>(DeviceErrorKind::kTimeout);
}

void DeviceErrors::throw_if_set() {
  if (!is_set()) return;
  volatile DeviceErrorWord* w = word_;
  DeviceErrorWord copy;
  copy.set = w->set;
  copy.kind = w->kind;
  copy.phase = w->phase;
  copy.peer = w->peer;
  copy.value = w->value;
  copy.abort = w->abort;
  copy.detail = w->detail;
  if (copy.kind != static_cast<int32_t>(DeviceErrorKind::kTimeout)) {
    // Re-arm: the next error after this point is recorded again. The claim is reset on the stream of
    // the kernels, after everything already queued there.
    w->set = 0;
    const cudaError_t status = cudaMemsetAsync(flags_, 0, sizeof(int32_t), reset_stream_);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      throw_error(ErrorCode::kInternal, concat("re-arming the device error word failed: ", cudaGetErrorString(status),
                                               "; the error was: ", to_error(copy).what()));
    }
  }
  throw to_error(copy);
}

}  // namespace epcomm::cuda
