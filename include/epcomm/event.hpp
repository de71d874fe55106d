// Completion of asynchronous work (SPEC §3.4): an Event is recorded on the buffer's communication
// stream after a call; the caller makes its own stream wait on it when it needs the results.
//
// CPU-backend calls complete before they return, so their events are always complete.
#pragma once

#include <memory>

#include "epcomm/tensor.hpp"

namespace epcomm {

class Event {
 public:
  // An event that is already complete (CPU backend, or "nothing to wait for").
  Event() = default;

  // Records a new CUDA event on `stream` (the current device must be the stream's device).
  static Event record(StreamHandle stream);

  bool is_cuda() const { return impl_ != nullptr; }
  // Makes `stream` wait until the event completes (no host blocking). No-op for a complete event.
  void wait(StreamHandle stream) const;
  // Blocks the host until the event completes.
  void synchronize() const;
  // True if the work before the event has finished.
  bool query() const;
  // The raw cudaEvent_t (nullptr for a complete event), for interop.
  ::CUevent_st* native() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace epcomm
