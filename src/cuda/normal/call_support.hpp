// Host-side pieces every normal-mode call uses: stream ordering (SPEC §3.4) and output allocation
// (core/allocate.hpp).
#pragma once

#include <cuda_runtime.h>

#include "core/allocate.hpp"
#include "epcomm/ops.hpp"

namespace epcomm::cuda {

// Two events a buffer reuses for every call's stream ordering (recording an event again is legal
// once the waits on its earlier recording are enqueued), so that calls create no CUDA objects: cheaper,
// and nothing but stream-ordered work happens while a CUDA graph is being captured.
struct OrderingEvents {
  cudaEvent_t caller_ready = nullptr;  // recorded on the caller's stream, waited on by the comm stream
  cudaEvent_t work_done = nullptr;     // recorded on the comm stream, waited on by the caller's stream
};

// Orders one call's work on the comm stream against the caller (SPEC §3.4). Construction makes the
// comm stream wait for `previous_event`, or else for everything already queued on the caller's stream;
// finish() records the end of the work and either returns it as a new event (async_finish) or makes
// the caller's stream wait for it and returns a complete event.
class CallStreams {
 public:
  CallStreams(cudaStream_t comm, const StreamOptions& options, const OrderingEvents& events);
  cudaStream_t comm() const { return comm_; }
  // Where outputs are first used: the comm stream with allocate_on_comm_stream, else the caller's.
  cudaStream_t allocation_stream() const { return options_.allocate_on_comm_stream ? comm_ : caller(); }
  Event finish() const;

 private:
  cudaStream_t caller() const { return reinterpret_cast<cudaStream_t>(options_.stream); }
  cudaStream_t comm_;
  StreamOptions options_;
  OrderingEvents events_;
};

// Rows are moved with 16-byte vector loads and stores: a tensor read or written that way must start
// on a 16-byte boundary (its rows are multiples of 16 bytes; op_checks made sure).
void require_vector_aligned(const TensorView& tensor, const char* op, const char* arg);

// cudaMemsetAsync that accepts empty tensors (whose data may be null).
void fill_bytes(void* data, int value, size_t bytes, cudaStream_t stream);

}  // namespace epcomm::cuda
