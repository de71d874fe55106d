// Argument checks of every operation, done once in the front before any backend work, so that
// both backends reject the same inputs with the same messages (SPEC §5). What a backend accepts
// beyond SPEC's ranges comes from its Limits (epcomm/limits.hpp): a value SPEC allows but the
// backend does not is Error(kUnsupported) naming the limit, anything else kInvalidArgument.
// Backends check only what needs the data itself (index values, capacities, allocator outputs).
#pragma once

#include "core/backend.hpp"

namespace epcomm {

struct CheckContext {
  const GroupGeometry& geometry;
  const Limits& limits;  // of the backend (and its device)
  Device device;         // where tensors must live
  uint64_t buffer_id;    // Backend::id(): handles must carry it
  const BufferOptions& options;
};

// Buffer construction, before any collective step: the options alone and the group's shape.
GroupGeometry check_buffer_options(const Limits& limits, const BufferOptions& options, int rank, int num_ranks);

LayoutArgs check_layout(const CheckContext& ctx, const TensorView& topk_idx, int num_experts);
DispatchArgs check_dispatch(const CheckContext& ctx, const DispatchInputs& inputs);
CombineArgs check_combine(const CheckContext& ctx, const CombineInputs& inputs);
LowLatencyDispatchArgs check_low_latency_dispatch(const CheckContext& ctx, const LowLatencyDispatchInputs& inputs,
                                                  const LowLatencyOptions& options);
LowLatencyCombineArgs check_low_latency_combine(const CheckContext& ctx, const LowLatencyCombineInputs& inputs,
                                                const LowLatencyOptions& options);
void check_next_low_latency_combine_buffer(const CheckContext& ctx, const LowLatencyHandle& handle);
void check_clean_low_latency_buffer(const CheckContext& ctx, int max_tokens_per_rank, int hidden, int num_experts);
// The three mask calls (SPEC §6); `rank` only for low_latency_update_mask_buffer.
void check_mask_call(const CheckContext& ctx, const char* op, std::optional<int> rank = std::nullopt);
// get_local_buffer_tensor: returns the number of elements of the view.
int64_t check_local_buffer(const CheckContext& ctx, DType dtype, int64_t offset_bytes,
                           std::optional<int64_t> num_elements, bool rdma_memory);

}  // namespace epcomm
