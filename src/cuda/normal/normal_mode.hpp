// High-throughput ("normal") mode of the CUDA backend (SPEC §3) inside one NVLink domain: the host
// side of get_dispatch_layout, dispatch (fresh and cached) and combine. The protocol is described in
// normal/protocol.hpp, the kernels in kernels/*.cu.
//
// Host synchronisation: only a fresh dispatch without num_worst_tokens waits on the host, for the
// received counts that size its outputs (pinned memory written by the notify kernel, bounded by the
// timeout, checking the error word). Every other path is asynchronous and CUDA-graph capturable: the
// call counter lives on the device, outputs come from the caller's allocator, nothing else is allocated.
//
// Errors found by kernels (timeouts, bad topk_idx values, num_worst_tokens overflow, ranks making
// different calls) are recorded in the device error word and thrown by the next host check: inside
// the host wait of a fresh dispatch, at the start of every call, or in CudaBackend::check_errors().
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/cuda_context.hpp"
#include "cuda/normal/call_support.hpp"
#include "cuda/normal/normal_memory.hpp"
#include "cuda/normal/params.hpp"

namespace epcomm::cuda {

// DispatchHandle::backend_state of the CUDA backend.
struct NormalHandleState {
  Tensor meta;  // [R + 2] int32 on the device: T of every rank, then the dispatch's epoch (low, high)
};

class NormalMode {
 public:
  // `memory` may be null (num_nvl_bytes == 0): layout still works, dispatch and combine throw.
  // `buffer_id` (Backend::id()) is stamped into handles; the front compares it.
  NormalMode(const CudaContext& ctx, NormalMemory* memory, uint64_t buffer_id);
  ~NormalMode();
  NormalMode(const NormalMode&) = delete;
  NormalMode& operator=(const NormalMode&) = delete;

  LayoutResult layout(const LayoutArgs& args, const StreamOptions& stream);
  DispatchResult dispatch(const DispatchArgs& args, const StreamOptions& stream);
  CombineResult combine(const CombineArgs& args, const StreamOptions& stream);
  // The front rejected this rank's inputs of a call (never launched): see with_rejections().
  void note_rejection() { ++rejections_; }

 private:
  // A fresh dispatch in four phases (normal_dispatch.cpp): route (routing kernel), exchange counts
  // (notify kernel), size outputs (the host wait), move tokens (dispatch kernel).
  struct FreshDispatch;
  DispatchResult fresh_dispatch(const DispatchArgs& args, const StreamOptions& stream);
  void route(FreshDispatch& call);
  void exchange_counts(FreshDispatch& call);
  int size_outputs(const FreshDispatch& call, DispatchResult& result, const char* op) const;
  void move_tokens(const FreshDispatch& call, int rows, DispatchResult& result);
  DispatchResult cached_dispatch(const DispatchArgs& args, const StreamOptions& stream);
  // Checks the buffer size a call needs and fills the part of the kernel params shared by every
  // kernel of the call (one node and the SM count are checked by the front against Limits).
  NormalCommon common_params(const Config& config, const RecordLayout& record, const char* op) const;
  // Waits until notify published the counts of the dispatch numbered `sequence`.
  void wait_for_counts(int32_t sequence, const char* op) const;

  const CudaContext& ctx_;
  NormalMemory* memory_;
  uint64_t buffer_id_;
  LocalState* state_ = nullptr;               // device memory
  HostCounts* host_counts_ = nullptr;         // pinned host memory
  HostCounts* host_counts_device_ = nullptr;  // the same, as the device sees it
  int32_t host_sequence_ = 0;
  uint64_t rejections_ = 0;
  OrderingEvents events_;
};

}  // namespace epcomm::cuda
