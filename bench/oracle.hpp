// The expected result of every timed call, computed on the host from the inputs alone, with SPEC's
// rules as the CPU backend applies them (src/core/semantics.hpp: routing, row order, localisation,
// reduction order, FP8 cast), so that the oracle keeps no second model of SPEC.
//
// Each rank gathers every rank's topk_idx once per workload (Routing); token values are pure
// functions of (seed, rank, token, column) (InputValues), so a rank knows the exact bytes of every
// row it should receive. Comparisons are bit for bit except for the NCCL baseline's combine, whose
// bf16 atomics round in an arbitrary order (a tolerance is stated there).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "epcomm/ops.hpp"
#include "platform.hpp"
#include "workload.hpp"

namespace epcomm::bench {

struct Source {
  int rank = 0;
  int64_t token = 0;
};

class Routing {
 public:
  // Collective over the bootstrap: every rank contributes its own [T, K] topk_idx.
  static Routing gather(Bootstrap& bootstrap, const Workload& workload, const std::vector<int64_t>& mine);

  int64_t expert(int rank, int64_t token, int slot) const {
    return topk_idx_[(int64_t(rank) * tokens + token) * topk + slot];
  }
  bool sends_to(int src, int64_t token, int dst) const;
  int receivers(int src, int64_t token) const;  // ranks a normal dispatch sends the token to
  // Normal dispatch: the rows rank `dst` receives, by source rank then token index.
  std::vector<Source> normal_rows(int dst) const;
  // Low-latency dispatch: the rows of global expert `expert`, by source rank then token index.
  std::vector<Source> expert_rows(int expert) const;

  int num_ranks = 0, tokens = 0, topk = 0, experts = 0, local_experts = 0;

 private:
  std::vector<int64_t> topk_idx_;  // [R, T, K]
};

// std::nullopt: as expected; else a message naming rank, row, source, column and both values.
using Mismatch = std::optional<std::string>;

class Oracle {
 public:
  // `ranks_per_node` = G of the Buffer checked (normal mode): N > 1 selects SPEC §3.6's combine order.
  Oracle(const Workload& workload, const Routing& routing, const InputValues& values, int rank, int ranks_per_node = 0)
      : w_(workload), routing_(routing), values_(values), me_(rank), ranks_per_node_(ranks_per_node) {}

  Mismatch layout(Platform& platform, const LayoutResult& result) const;
  // `fresh`: a dispatch with topk_idx (checks recv_topk_*, per-expert counts, the handle).
  Mismatch dispatch(Platform& platform, const DispatchResult& result, bool fp8, bool fresh) const;
  // Combine of the BF16 dispatch's own recv_x: every receiver sends the token back unchanged, and the
  // expected sum is SPEC §3.3's order (one node) or §3.6's (N > 1), from src/core/semantics.hpp.
  Mismatch combine(Platform& platform, const CombineResult& result, bool with_weights) const;
  Mismatch low_latency_dispatch(Platform& platform, const LowLatencyDispatchResult& result, bool fp8) const;
  // Low-latency combine of the BF16 dispatch's recv_x: bf16(fma chain of w[t,k] * x[t]).
  Mismatch low_latency_combine(Platform& platform, const LowLatencyCombineResult& result) const;
  // The baseline: its recv_x has epcomm's order; its combine is checked to a tolerance.
  Mismatch baseline_dispatch(Platform& platform, const TensorView& recv_x) const;
  Mismatch baseline_combine(Platform& platform, const TensorView& combined_x) const;

 private:
  Mismatch layout_per_node(Platform& platform, const LayoutResult& result) const;
  Mismatch normal_topk(Platform& platform, const DispatchResult& result, const std::vector<Source>& rows) const;
  Mismatch normal_counts(Platform& platform, const DispatchResult& result) const;
  Mismatch normal_rows(const TensorView& recv_x, const std::optional<Tensor>& scales, const std::vector<Source>& rows,
                       bool fp8) const;
  Mismatch expert_rows(Platform& platform, const LowLatencyDispatchResult& result, const TensorView& recv_x,
                       const TensorView& scales, const TensorView& src_info, const TensorView& layout_range, int local,
                       int count, bool fp8) const;

  const Workload& w_;
  const Routing& routing_;
  const InputValues& values_;
  int me_;
  int ranks_per_node_;  // G; 0 = one node
};

}  // namespace epcomm::bench
