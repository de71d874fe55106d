// High-throughput ("normal") mode of the CPU reference backend (SPEC §3). Arguments arrive checked
// for shape, dtype and device by the front (core/op_checks.cpp); this code checks what needs the data
// (index values, consistency of the layout tensors, capacities, agreement between ranks).
//
// Protocol. Ranks only ever write their own area (num_nvl_bytes) and read their peers' (a pull model),
// and every step ends with a barrier on kNormalChannel, so a step never reads memory that is being
// rewritten. The area is not sized by T, so tokens move in rounds:
//
//   dispatch  1. exchange of calls (normal_exchange.hpp): every rank's T, per-destination and
//                per-expert counts -> rank_prefix_matrix, the receive count, the output sizes.
//             2. rounds over token indices [jC, (j+1)C), C = tokens whose records fit in the area:
//                each rank publishes its tokens of the window as records (payload, scales, top-k,
//                destination flags); barrier; each rank copies the records flagged for it, source
//                by source in ascending order, into their final rows; barrier.
//   cached    the same, with the routing of the handle and no counts.
//   combine   1. exchange of calls (shapes, which dispatch made the handle).
//             2. rounds over source-token windows: each rank publishes, per source rank, the
//                contiguous run of its received rows whose source token is in the window (rows from
//                one source are sorted by token); barrier; each rank reduces its own tokens of the
//                window, adding the receiving ranks' rows in ascending rank order; barrier.
#pragma once

#include "cpu/cpu_context.hpp"
#include "cpu/normal_exchange.hpp"

namespace epcomm::cpu {

class NormalMode {
 public:
  // `area` is the normal-mode area (num_nvl_bytes) of every rank.
  NormalMode(const CpuContext& ctx, Area area) : ctx_(ctx), area_(area) {}

  // Local: no communication.
  LayoutResult layout(const LayoutArgs& args, Allocator& allocator, StreamHandle stream) const;
  // Collective. Fresh (args.cached == false) or cached dispatch.
  DispatchResult dispatch(const DispatchArgs& args, StreamHandle stream);
  // Collective.
  CombineResult combine(const CombineArgs& args, StreamHandle stream);
  // Collective: takes part in the call's exchange with a rejected entry carrying `error` (SPEC §5),
  // so that the peers raise it too. Throws kPeerFailure when the ranks are at different calls.
  void reject(CallKind kind, const Error& error);

 private:
  DispatchResult fresh_dispatch(const DispatchArgs& args, StreamHandle stream);
  DispatchResult cached_dispatch(const DispatchArgs& args, StreamHandle stream);
  // The exchange of every call, numbered.
  std::vector<PeerCall> exchange(CallHeader header, std::span<const int32_t> counts, const char* op,
                                 std::string_view message = {});
  // Runs `local` (the checks of this rank's inputs before the exchange); an error is rejected first.
  template <class Local>
  auto before_exchange(CallKind kind, Local&& local);

  CpuContext ctx_;
  Area area_;
  uint64_t last_call_number_ = 0;
};

}  // namespace epcomm::cpu
