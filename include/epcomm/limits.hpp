// epcomm::Limits: what a backend of this build accepts, beyond the ranges SPEC.md gives every
// backend. Ask it (epcomm::backend_limits(kind) before a Buffer exists, Buffer::limits() for the
// device a Buffer runs on) instead of trying a call and catching Error(kUnsupported): the front
// checks every call against the same struct, so a call inside these limits is never rejected as
// unsupported, and one outside them is rejected before any work, naming the limit.
#pragma once

#include <cstdint>
#include <vector>

#include "epcomm/tensor.hpp"

namespace epcomm {

enum class BackendKind : uint8_t;

struct Limits {
  BackendKind backend{};
  // ---- modes and group shapes ----
  bool available = false;               // this build contains the backend
  bool normal_mode = false;             // high-throughput dispatch / combine (SPEC §3)
  bool low_latency_mode = false;        // a Buffer with low_latency_mode=True can be created (SPEC §4)
  bool normal_inter_node = false;       // high-throughput mode across more than one node (ranks_per_node < R)
  bool low_latency_inter_node = false;  // low-latency mode across more than one node
  int max_ranks = 0;                    // R
  int max_ranks_per_node = 0;           // G

  // ---- high-throughput mode ----
  int max_topk = 0;                 // K of topk_idx / topk_weights
  int row_alignment_bytes = 0;      // hidden * element size must be a positive multiple of this
  int data_alignment_bytes = 0;     // address alignment of x, bias_0/1 and low-latency x / out (1 = none)
  int max_num_sms = 0;              // Config.num_sms (the CUDA backend: also at most the GPU's SMs)
  int max_local_experts = 0;        // num_experts / R of a dispatch
  std::vector<DType> x_dtypes;      // dispatch x
  std::vector<DType> scale_dtypes;  // FP8 x_scales: float32 [T, hidden/128], int32 UE8M0-packed [T, hidden/512]

  // ---- low-latency mode ----
  int max_low_latency_topk = 0;
  int low_latency_hidden_multiple = 0;      // hidden must be a positive multiple of this
  int max_low_latency_tokens_per_rank = 0;  // num_max_dispatch_tokens_per_rank
  int max_low_latency_experts = 0;          // num_experts
  bool use_logfmt = false;                  // low_latency_combine(use_logfmt=True)
};

// The limits of `kind` in this build (available = false when it is not compiled in). Never throws.
Limits backend_limits(BackendKind kind);

}  // namespace epcomm
