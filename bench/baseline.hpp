// What a PyTorch user writes without an EP library, in C++: NCCL all-to-all with per-peer counts
// (all_to_all_single with splits) plus the gather / scatter around it.
//
//   dispatch:        per-destination counts of the routing, exchange of the counts (all-to-all of
//                    R ints), host wait for them (.tolist()), index_select of the rows by
//                    destination, all-to-all of the rows.
//   dispatch_cached: the last two steps (counts and index known), the analogue of epcomm's cached
//                    dispatch.
//   combine:         all-to-all of the received rows back to their owners, then index_add into a
//                    zeroed [T, hidden] (bf16 atomics, as torch.index_add_ on a bf16 tensor).
//
// A token is sent to a rank once, like epcomm's normal dispatch, so both move the same bytes; and
// the rows arrive grouped by source rank, by token index inside a source: epcomm's order.
#pragma once

#include <memory>

#include "platform.hpp"

namespace epcomm::bench {

class AllToAllBaseline {
 public:
  virtual ~AllToAllBaseline() = default;
  virtual void dispatch() = 0;
  virtual void dispatch_cached() = 0;         // needs one dispatch() before
  virtual void combine() = 0;                 // sends back what the last dispatch received
  virtual TensorView recv_x() const = 0;      // [num_recv, hidden] bf16 after a dispatch
  virtual TensorView combined_x() const = 0;  // [T, hidden] bf16 after a combine
};

// x [T, hidden] bf16 and topk_idx [T, K] int64 on the platform's GPU (they must outlive the
// baseline). Throws Error(kUnsupported) without the CUDA parts of the bench.
std::unique_ptr<AllToAllBaseline> make_nccl_baseline(Platform& platform, const TensorView& x,
                                                     const TensorView& topk_idx, int num_experts);

}  // namespace epcomm::bench
