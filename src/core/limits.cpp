#include "core/backend.hpp"
#include "core/layouts.hpp"

namespace epcomm {

Limits spec_limits() {
  Limits limits;
  limits.normal_mode = true;
  limits.max_ranks = kMaxRanks;
  limits.max_ranks_per_node = kMaxRanksPerNode;
  limits.max_topk = kMaxTopk;
  limits.row_alignment_bytes = 16;
  limits.data_alignment_bytes = 1;
  limits.max_num_sms = INT32_MAX;
  limits.max_local_experts = INT32_MAX;
  limits.x_dtypes = {DType::kBFloat16, DType::kFloat8E4M3};
  limits.scale_dtypes = {DType::kFloat32, DType::kInt32};
  limits.max_low_latency_topk = kMaxLowLatencyTopk;
  limits.low_latency_hidden_multiple = kFp8GroupSize;
  limits.max_low_latency_tokens_per_rank = INT32_MAX;
  limits.max_low_latency_experts = INT32_MAX;
  return limits;
}

Limits backend_limits(BackendKind kind) {
  return kind == BackendKind::kCpu ? cpu_backend_limits() : cuda_backend_limits();
}

}  // namespace epcomm
