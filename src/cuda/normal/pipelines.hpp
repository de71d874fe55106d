// How the dispatch and combine kernels cut their shared memory into bulk-copy stages, and how many
// warps serve them. Plain host code (no CUDA headers) so that the CPU tests can check the plans;
// the kernels receive the result in their params (kernels/dispatch.cu, kernels/combine.cu).
//
// Every stage (an mbarrier pair and a slice of shared memory) is served by ONE fixed worker (thread
// or warp) that handles every use of it in order: a worker waiting on an mbarrier phase must never be
// more than one phase ahead of it (the parity rule, device/ptx.cuh). With W workers taking stages
// round-robin, stage k always goes to worker k % W exactly when W divides the number of stages, so
// the plans below always pick stages = a multiple of workers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/normal/protocol.hpp"

namespace epcomm::cuda {

constexpr int kNormalWarps = 16;        // warps per block of the dispatch and combine kernels
constexpr int kMaxStages = 64;          // stages (or units) per block: sizes the static mbarrier arrays
constexpr int kMaxProducers = 8;        // dispatch sender: warps that stage tokens
constexpr int kCombineSendStages = 4;   // combine sender: stages per destination it aims for
constexpr int kCombineRecvUnits = 4;    // combine receiver: units in flight it aims for
constexpr int64_t kStageAlignment = 128;

struct WorkerSplit {
  int32_t workers = 0;
  int32_t stages = 0;  // a multiple of workers; 0 when not even one stage fits
};

// The most stages (<= max_stages) that `workers` workers can share evenly, for workers between half
// of max_workers and max_workers (never more workers than stages); ties go to more workers.
inline WorkerSplit split_stages(int max_stages, int max_workers) {
  WorkerSplit best;
  const int most = std::min(max_workers, max_stages);
  const int least = std::max(1, std::min(most, (max_workers + 1) / 2));
  for (int workers = least; workers <= most; ++workers) {
    const int stages = max_stages / workers * workers;
    if (stages >= best.stages) best = {workers, stages};
  }
  return best;
}

// A piece size (a multiple of 16, at most max(16, max_piece_bytes)) that cuts `payload_bytes` (a
// positive multiple of 16) into the fewest pieces, as even as 16-byte granularity allows.
inline int32_t even_piece_bytes(int64_t payload_bytes, int64_t max_piece_bytes) {
  const int64_t vectors = std::max<int64_t>(1, payload_bytes / 16);
  const int64_t max_vectors = std::max<int64_t>(1, max_piece_bytes / 16);
  const int64_t pieces = (vectors + max_vectors - 1) / max_vectors;
  return static_cast<int32_t>(16 * ((vectors + pieces - 1) / pieces));
}

inline int32_t pieces_of(int64_t payload_bytes, int64_t piece_bytes) {
  return static_cast<int32_t>(std::max<int64_t>(1, (payload_bytes + piece_bytes - 1) / piece_bytes));
}

// Dispatch: a sender block stages whole tokens (the record without its header: meta + payload) and
// stores each to every destination from the same stage; a receiver block loads whole records.
struct DispatchPipeline {
  int32_t send_stages = 0;       // a multiple of producers
  int32_t send_stage_bytes = 0;  // record bytes - 16, rounded up to kStageAlignment
  int32_t producers = 0;         // warps staging tokens: producer w serves stages w, w + producers, ...
  int32_t recv_stages = 0;       // a multiple of writers
  int32_t recv_stage_bytes = 0;  // record bytes, rounded up
  int32_t writers = 0;           // warps writing records out: writer w serves stages w, w + writers, ...
  int32_t smem_bytes = 0;        // dynamic shared memory of the kernel (the larger role)

  bool valid() const { return send_stages > 0 && recv_stages > 0; }
};

inline DispatchPipeline plan_dispatch(const RecordLayout& record, int num_ranks, int64_t smem_budget) {
  auto align = [](int64_t bytes) { return (bytes + kStageAlignment - 1) / kStageAlignment * kStageAlignment; };
  DispatchPipeline p;
  p.send_stage_bytes = static_cast<int32_t>(align(record.bytes() - 16));
  const WorkerSplit send = split_stages(static_cast<int>(std::min<int64_t>(kMaxStages, smem_budget / p.send_stage_bytes)),
                                        std::min(kMaxProducers, kNormalWarps - num_ranks));
  p.producers = send.workers;
  p.send_stages = send.stages;
  p.recv_stage_bytes = static_cast<int32_t>(align(record.bytes()));
  const WorkerSplit recv = split_stages(static_cast<int>(std::min<int64_t>(kMaxStages, smem_budget / p.recv_stage_bytes)),
                                        kNormalWarps - 1);
  p.writers = recv.workers;
  p.recv_stages = recv.stages;
  p.smem_bytes = static_cast<int32_t>(
      std::max<int64_t>(int64_t(p.send_stages) * p.send_stage_bytes, int64_t(p.recv_stages) * p.recv_stage_bytes));
  return p;
}

// Combine: a sender block runs one pipeline per destination rank (its rows for that rank are
// contiguous): pieces of rows go through `send_stages` stages of its own. A receiver block works in
// units = (token, piece of the row): a unit holds that piece of every record of the token (the first
// piece also brings each record's meta part) and of every bias row.
struct CombinePipeline {
  int32_t send_stages = 0;       // per destination rank (>= 2)
  int32_t send_piece_bytes = 0;  // payload bytes per piece; the last piece of a row may be shorter
  int32_t send_pieces = 0;       // pieces per row
  int32_t send_stage_bytes = 0;  // send_piece_bytes rounded up
  int32_t recv_units = 0;        // a multiple of reducers
  int32_t recv_piece_bytes = 0;
  int32_t recv_pieces = 0;
  int32_t recv_slot_bytes = 0;  // one record's place in a unit: meta part + one piece
  int32_t recv_unit_bytes = 0;  // R slots + num_bias pieces, rounded up
  int32_t num_bias = 0;
  int32_t reducers = 0;  // warps reducing units: reducer w serves units w, w + reducers, ...
  int32_t smem_bytes = 0;

  bool valid() const { return send_stages >= 2 && recv_units > 0; }
};

inline CombinePipeline plan_combine(const RecordLayout& record, int num_ranks, int num_bias, int64_t smem_budget) {
  auto align = [](int64_t bytes) { return (bytes + kStageAlignment - 1) / kStageAlignment * kStageAlignment; };
  const int R = num_ranks;
  CombinePipeline p;
  const int64_t per_rank = smem_budget / R;
  p.send_piece_bytes = even_piece_bytes(record.payload_bytes, per_rank / kCombineSendStages);
  p.send_pieces = pieces_of(record.payload_bytes, p.send_piece_bytes);
  p.send_stage_bytes = static_cast<int32_t>(align(p.send_piece_bytes));
  p.send_stages = static_cast<int32_t>(std::min<int64_t>(kMaxStages / R, per_rank / p.send_stage_bytes));

  const int64_t meta = record.meta_bytes();
  const int64_t max_piece = (smem_budget / kCombineRecvUnits - R * meta) / (R + num_bias);
  p.num_bias = num_bias;
  if (max_piece >= 16) {
    p.recv_piece_bytes = even_piece_bytes(record.payload_bytes, max_piece);
    p.recv_pieces = pieces_of(record.payload_bytes, p.recv_piece_bytes);
    p.recv_slot_bytes = static_cast<int32_t>(meta + p.recv_piece_bytes);
    p.recv_unit_bytes = static_cast<int32_t>(align(int64_t(R) * p.recv_slot_bytes + int64_t(num_bias) * p.recv_piece_bytes));
    const WorkerSplit recv = split_stages(static_cast<int>(std::min<int64_t>(kMaxStages, smem_budget / p.recv_unit_bytes)),
                                          kNormalWarps - 1);
    p.reducers = recv.workers;
    p.recv_units = recv.stages;
  }
  p.smem_bytes = static_cast<int32_t>(std::max<int64_t>(int64_t(R) * p.send_stages * p.send_stage_bytes,
                                                        int64_t(p.recv_units) * p.recv_unit_bytes));
  return p;
}

}  // namespace epcomm::cuda
