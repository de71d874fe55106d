// Argument checks of every operation, done once in the front before any backend work, so that
// both backends reject the same inputs with the same messages (SPEC §5).
#pragma once

#include "core/backend.hpp"

namespace epcomm {

struct CheckContext {
  const GroupGeometry& geometry;
  Device device;       // where tensors must live
  uint64_t buffer_id;  // Backend::id(): handles must carry it
  const BufferOptions& options;
};

LayoutArgs check_layout(const CheckContext& ctx, const TensorView& topk_idx, int num_experts);
DispatchArgs check_dispatch(const CheckContext& ctx, const DispatchInputs& inputs);
CombineArgs check_combine(const CheckContext& ctx, const CombineInputs& inputs);
LowLatencyDispatchArgs check_low_latency_dispatch(const CheckContext& ctx, const LowLatencyDispatchInputs& inputs,
                                                  const LowLatencyOptions& options);
LowLatencyCombineArgs check_low_latency_combine(const CheckContext& ctx, const LowLatencyCombineInputs& inputs,
                                                const LowLatencyOptions& options);
// The handle's own fields (shapes, consistency), shared by combine and the zero-copy buffer query.
void check_low_latency_handle(const CheckContext& ctx, const LowLatencyHandle& handle, const char* op);

}  // namespace epcomm
