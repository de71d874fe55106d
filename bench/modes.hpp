// The three families of figures: epcomm's normal mode, epcomm's low-latency mode, and the NCCL
// all-to-all baseline. Each is collective over the ranks and adds its rows to the report on rank 0.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "epcomm/limits.hpp"
#include "measure.hpp"
#include "oracle.hpp"
#include "workload.hpp"

namespace epcomm::bench {

// This rank's inputs of one workload (host copies) and everyone's routing.
struct WorkloadData {
  Workload workload;
  InputValues values;
  std::vector<int64_t> topk_idx;    // [T, K]
  std::vector<float> topk_weights;  // [T, K]
  std::vector<uint16_t> x_bf16;     // [T, hidden]
  Routing routing;
  int64_t recv_tokens = 0;  // rows this rank receives in a normal dispatch (own tokens included)
  int64_t selections = 0;   // this rank's (token, slot) pairs with an expert (low-latency bytes)
};

// Collective (gathers the routing).
WorkloadData prepare_workload(BenchContext& ctx, const Workload& workload);

// Why the backend with `limits` cannot run the mode on this workload over `ranks` ranks (one
// node), or nullopt when it can.
std::optional<std::string> normal_mode_unsupported(const Limits& limits, const Workload& w, int ranks);
std::optional<std::string> low_latency_mode_unsupported(const Limits& limits, const Workload& w, int ranks);

void run_normal_mode(BenchContext& ctx, const WorkloadData& data);
void run_low_latency_mode(BenchContext& ctx, const WorkloadData& data);
void run_nccl_baseline(BenchContext& ctx, const WorkloadData& data);

}  // namespace epcomm::bench
