// Combine (SPEC §3.3): the reverse of dispatch. 2 C blocks: block 2c sends channel c, block 2c + 1
// receives it; channel c covers the same token range of each source rank as in dispatch's split
// (with this call's C), so the records a rank gets from one peer on one channel arrive in token order.
//
// Data moves with bulk copies (TMA) through stages in shared memory (kernels/pipeline.cuh,
// normal/pipelines.hpp); docs/CUDA_NORMAL_MODE.md argues the ordering and the progress of it all.
//
// Sender block: warp d serves destination rank d on its own (its own stages, nothing shared with the
// other destinations, so a full queue in one rank never holds up the others). The rows this rank
// received from d are sorted by source token, so channel c's rows are one contiguous run, found by
// binary search in recv_src_idx. Lane 0 streams them in pieces: bulk load into a stage, bulk store
// into the record's slot in d's queue, the stage refilled as soon as its store has read it; the lanes
// write each record's header and weights with plain stores (loaded one row ahead). Tails are
// published like dispatch's, kPublishLag bulk groups behind the newest.
//
// Receiver block: units = (token, piece of the row). The loader warp (lane r follows source r) waits
// until every record of the next token is published, then bulk-loads that piece of each record (the
// first piece with the record's meta part) and of each bias row into the next unit; heads go back
// once half a queue of a source's records landed. Reducer warps take units round-robin and reduce in
// the fixed order
//   acc = 0.0f; for r ascending: acc += float(row_r); acc += bias_0; acc += bias_1; out = bf16_rn(acc)
// with __fadd_rn (never contracted) and numerics::float_to_bf16, bit-identical to the CPU reference.
#include "core/cuda_check.hpp"
#include "core/numerics.hpp"
#include "cuda/kernels/common.cuh"
#include "cuda/kernels/pipeline.cuh"
#include "cuda/normal/launch.hpp"

namespace epcomm::cuda {
namespace kernels {
namespace {

constexpr int kPublishLag = 4;  // bulk groups (pieces) a sender leaves in flight when it publishes

// What the loader tells the reducers about a unit, besides its data.
struct CombineShared {
  StageBarriers barriers;
  int32_t token[kMaxStages];     // the unit's token (on this rank)
  uint32_t sources[kMaxStages];  // ranks that sent it a record: slot j holds the j-th of them, ascending
  int32_t piece[kMaxStages];
};

// Bytes of piece `piece` of a payload cut into pieces of `piece_bytes`.
__device__ __forceinline__ uint32_t piece_size(int64_t payload_bytes, int32_t piece_bytes, uint32_t piece) {
  return static_cast<uint32_t>(min(int64_t(piece_bytes), payload_bytes - int64_t(piece) * piece_bytes));
}

// ---- sender ----------------------------------------------------------------------------------------

// Warp `dst`: sends this rank's rows from `dst` (channel c's run of them) back to `dst`.
class RowSender {
 public:
  __device__ RowSender(const CombineParams& p, int channel, uint64_t epoch, CombineShared& sh, uint8_t* ring, int dst,
                       int lane)
      : p_(p), c_(p.common), epoch_(epoch), lane_(lane), dst_(dst) {
    const CombinePipeline& pipe = p.pipeline;
    const int R = c_.num_ranks, me = c_.rank;
    full_ = &sh.barriers.full[dst * pipe.send_stages];
    armed_ = &sh.barriers.armed[dst * pipe.send_stages];
    stages_ = ring + int64_t(dst) * pipe.send_stages * pipe.send_stage_bytes;
    queue_ = c_.peers[dst] + c_.queues.queue_offset(me, channel);
    tail_ = at_offset<uint64_t>(c_.peers[dst], tail_offset(me, channel));
    head_ = at_offset<const uint64_t>(c_.peers[me], head_offset(dst, channel));
    // Rows from `dst` are [first, last); channel c's tokens of dst are [range.begin, range.end).
    const int first = min(dst == 0 ? 0 : p.rank_prefix_matrix[(dst - 1) * R + me], p.num_recv_rows);
    const int last = min(p.rank_prefix_matrix[dst * R + me], p.num_recv_rows);
    const TokenRange range = channel_tokens(p.handle_meta[dst], c_.queues.num_channels, channel);
    begin_ = warp_lower_bound(p.recv_src_idx, first, last, range.begin, lane);
    num_rows_ = static_cast<uint32_t>(warp_lower_bound(p.recv_src_idx, begin_, last, range.end, lane) - begin_);
  }

  __device__ void run() {
    const CombinePipeline& pipe = p_.pipeline;
    const RecordLayout& layout = c_.record;
    const uint32_t S = pipe.send_stages, pieces = pipe.send_pieces, Q = static_cast<uint32_t>(c_.queues.queue_tokens);
    const uint32_t total = num_rows_ * pieces;  // pieces to move, row after row
    if (lane_ == 0)
      for (uint32_t g = 0; g < min(S, total); ++g) load_piece(g);
    int32_t next_token = 0;
    float next_weight = 0.0f;
    if (num_rows_ > 0) load_meta(0, next_token, next_weight);

    bool ok = true;
    char* slot = nullptr;
    for (uint32_t g = 0; g < total && ok; ++g) {
      const uint32_t row = g / pieces, piece = g % pieces;
      if (piece == 0) {
        const int32_t token = next_token;
        const float weight = next_weight;
        if (row + 1 < num_rows_) load_meta(row + 1, next_token, next_weight);
        if (row >= freed_ + Q) {
          ok = wait_for_space(row);
          if (!ok) break;
        }
        slot = queue_ + int64_t(row % Q) * c_.queues.record_bytes;
        if (lane_ == 0) device::store_16(slot, make_int4(token, begin_ + static_cast<int32_t>(row), 0, 0));
        if (lane_ < layout.num_topk) reinterpret_cast<float*>(slot + layout.weights_offset())[lane_] = weight;
      }
      if (lane_ == 0) ok = store_piece(g, slot + layout.payload_offset() + int64_t(piece) * pipe.send_piece_bytes);
      ok = __shfl_sync(~0u, ok, 0);
      if (ok && piece == pieces - 1 && g + 1 > kPublishLag) {
        // Rows whose pieces all completed once at most kPublishLag groups are pending.
        const uint32_t ready = (g + 1 - kPublishLag) / pieces;
        if (ready >= published_ + static_cast<uint32_t>(c_.chunk_tokens)) {
          if (lane_ == 0) device::bulk_wait<kPublishLag>();
          publish(ready, false);
        }
      }
    }
    if (lane_ == 0) device::bulk_wait<0>();
    if (ok) publish(num_rows_, true);
  }

 private:
  // Lane 0: piece g into stage g % S.
  __device__ void load_piece(uint32_t g) {
    const CombinePipeline& pipe = p_.pipeline;
    const uint32_t S = pipe.send_stages, row = g / pipe.send_pieces, piece = g % pipe.send_pieces;
    const int k = static_cast<int>(g % S);
    const uint32_t bytes = piece_size(c_.record.payload_bytes, pipe.send_piece_bytes, piece);
    armed_[k] = g / S + 1;
    device::mbarrier_arrive_expect_tx(&full_[k], bytes);
    device::bulk_load(stages_ + int64_t(k) * pipe.send_stage_bytes,
                      reinterpret_cast<const char*>(p_.x) + int64_t(begin_ + row) * c_.record.payload_bytes +
                          int64_t(piece) * pipe.send_piece_bytes,
                      bytes, &full_[k]);
  }

  // Lane 0: stores piece g (staged) to `destination`, then refills the previous piece's stage with
  // the piece S - 1 after this one.
  __device__ bool store_piece(uint32_t g, char* destination) {
    const CombinePipeline& pipe = p_.pipeline;
    const uint32_t S = pipe.send_stages, total = num_rows_ * pipe.send_pieces;
    const int k = static_cast<int>(g % S);
    if (!wait_phase(&full_[k], use_parity(g, S), c_, WaitSite{DevicePhase::kCombineSend, dst_})) return false;
    device::bulk_store(destination, stages_ + int64_t(k) * pipe.send_stage_bytes,
                       piece_size(c_.record.payload_bytes, pipe.send_piece_bytes, g % pipe.send_pieces));
    device::bulk_commit();
    if (g >= 1 && g - 1 + S < total) {
      device::bulk_wait_read<1>();  // the previous store has read its stage
      load_piece(g - 1 + S);
    }
    return true;
  }

  // Lane 0: the source token of row `row`; lane k < K: its weight k.
  __device__ void load_meta(uint32_t row, int32_t& token, float& weight) const {
    const int32_t at = begin_ + static_cast<int32_t>(row);
    const int K = c_.record.num_topk;
    if (lane_ == 0) token = __ldg(p_.recv_src_idx + at);
    if (lane_ < K) weight = p_.topk_weights != nullptr ? __ldg(p_.topk_weights + int64_t(at) * K + lane_) : 0.0f;
  }

  // The queue in dst is full up to record `row`: publish what is stored, wait for the receiver.
  __device__ bool wait_for_space(uint32_t row) {
    const uint32_t Q = static_cast<uint32_t>(c_.queues.queue_tokens);
    if (lane_ == 0) device::bulk_wait<0>();
    publish(row, false);
    bool ok = true;
    uint32_t freed = freed_;
    if (lane_ == 0) {
      ok = device::wait_until(
          [&] {
            freed = count_of(device::load_acquire_sys(head_), epoch_);
            return row < freed + Q;
          },
          c_.timeout_ns, c_.errors, WaitSite{DevicePhase::kCombineSend, dst_});
      device::fence_proxy_async_global();  // the receiver's reads of the slots before our writes
    }
    freed_ = __shfl_sync(~0u, freed, 0);
    __syncwarp();  // the other lanes' header and weight stores come after lane 0's acquire
    return __shfl_sync(~0u, ok, 0);
  }

  // Whole warp, after lane 0's bulk_wait: rows below `count` completed; the lanes' plain stores are
  // ordered before lane 0's release by the warp barrier.
  __device__ void publish(uint32_t count, bool done) {
    __syncwarp();
    if (lane_ == 0) {
      device::fence_proxy_async_global();
      if (!device::aborted(c_.errors)) device::store_release_sys(tail_, pack_tail(epoch_, count, done));
    }
    published_ = count;
  }

  const CombineParams& p_;
  const NormalCommon& c_;
  uint64_t epoch_;
  int lane_, dst_;
  uint64_t* full_;
  uint32_t* armed_;
  uint8_t* stages_;
  char* queue_;
  uint64_t* tail_;
  const uint64_t* head_;
  int begin_;
  uint32_t num_rows_;
  uint32_t published_ = 0, freed_ = 0;
};

// ---- receiver --------------------------------------------------------------------------------------

// The receiver's loader warp. Lane r < R follows source r: the index (in r's queue) of r's record for
// the next token, records r published (tail), landed (load complete: the slot is free), returned.
class UnitLoader {
 public:
  __device__ UnitLoader(const CombineParams& p, int channel, uint64_t epoch, CombineShared& sh, uint8_t* ring, int lane)
      : p_(p), c_(p.common), channel_(channel), epoch_(epoch), sh_(sh), ring_(ring), lane_(lane) {
    const int me = c_.rank;
    const int source = lane < c_.num_ranks ? lane : 0;
    tail_ = at_offset<const uint64_t>(c_.peers[me], tail_offset(source, channel));
    head_ = at_offset<uint64_t>(c_.peers[source], head_offset(me, channel));
  }

  __device__ void run() {
    const int R = c_.num_ranks;
    const TokenRange range = channel_tokens(p_.num_tokens, c_.queues.num_channels, channel_);
    for (int window = range.begin; window < range.end; window += kWarpSize) {
      const int t = window + lane_;
      uint32_t sources = 0;
      if (t < range.end)
        for (int r = 0; r < R; ++r) sources |= uint32_t(p_.in_rank[int64_t(t) * R + r] != 0) << r;
      const int n = min(kWarpSize, range.end - window);
      for (int i = 0; i < n; ++i) {
        const uint32_t from = __shfl_sync(~0u, sources, i);
        if (!wait_for_records(from)) return;
        for (int piece = 0; piece < p_.pipeline.recv_pieces; ++piece)
          if (!fill_unit(window + i, from, piece)) return;
        if ((from >> lane_) & 1u) ++next_;
      }
    }
  }

 private:
  // Until every source in `from` published its record for the next token (polling our tails),
  // retiring landed units and returning heads meanwhile. False when it gave up.
  __device__ bool wait_for_records(uint32_t from) {
    retire(/*block=*/false);  // heads go back whether or not we have to wait
    return_heads();
    IdleClock idle;
    while (true) {
      const bool missing = ((from >> lane_) & 1u) && published_ <= next_;
      const uint32_t waiting = __ballot_sync(~0u, missing);
      if (waiting == 0) break;
      bool moved = false;
      if (missing) {
        const uint32_t count = count_of(device::load_acquire_sys(tail_), epoch_);
        if (count > published_) {
          published_ = count;
          moved = true;
        }
      }
      retire(/*block=*/false);
      return_heads();
      if (__any_sync(~0u, moved)) {
        idle.progress();
        continue;
      }
      const IdleClock::Verdict verdict = idle.idle(c_);
      if (verdict == IdleClock::kAborted) return false;
      if (verdict == IdleClock::kTimedOut) {
        if (lane_ == 0)
          device::report_error(c_.errors, DeviceErrorKind::kTimeout, DevicePhase::kCombineRecv, __ffs(waiting) - 1,
                               static_cast<int64_t>(c_.timeout_ns));
        return false;
      }
    }
    __syncwarp();
    if (lane_ == 0) device::fence_proxy_async_global();  // the acquires above before our bulk loads
    return true;
  }

  // The next unit gets piece `piece` of token `token`: that piece of every record from `from` (slot j
  // for the j-th source, ascending; the first piece with the record's meta part) and of every bias.
  __device__ bool fill_unit(int token, uint32_t from, int piece) {
    const CombinePipeline& pipe = p_.pipeline;
    const RecordLayout& layout = c_.record;
    StageBarriers& b = sh_.barriers;
    const uint32_t U = pipe.recv_units, sequence = filled_, Q = static_cast<uint32_t>(c_.queues.queue_tokens);
    const int k = static_cast<int>(sequence % U);
    if (sequence >= U) {  // the unit's previous use must have landed and been reduced
      while (retired_ <= sequence - U)
        if (!retire(/*block=*/true)) return false;
      if (!warp_wait_phase(&b.empty[k], use_parity(sequence - U, U), c_, WaitSite{DevicePhase::kCombineRecv, c_.rank},
                           lane_))
        return false;
    }
    uint8_t* unit = ring_ + int64_t(k) * pipe.recv_unit_bytes;
    const uint32_t bytes = piece_size(layout.payload_bytes, pipe.recv_piece_bytes, piece);
    const uint32_t meta = piece == 0 ? static_cast<uint32_t>(layout.meta_bytes()) : 0u;
    const int64_t offset = int64_t(piece) * pipe.recv_piece_bytes;
    if (lane_ == 0) {
      sh_.token[k] = token;
      sh_.sources[k] = from;
      sh_.piece[k] = piece;
      b.armed[k] = sequence / U + 1;
      device::mbarrier_arrive_expect_tx(&b.full[k], __popc(from) * (meta + bytes) + pipe.num_bias * bytes);
    }
    int j = 0;
    for (int r = 0; r < c_.num_ranks; ++r) {
      const uint32_t index = __shfl_sync(~0u, next_, r);
      if (((from >> r) & 1u) == 0) continue;
      if (lane_ == 0) {
        const char* record = c_.peers[c_.rank] + c_.queues.queue_offset(r, channel_) + int64_t(index % Q) * c_.queues.record_bytes;
        uint8_t* slot = unit + int64_t(j) * pipe.recv_slot_bytes;
        // slot = | meta part | piece |: the first piece comes with the meta part in one copy.
        device::bulk_load(slot + layout.meta_bytes() - meta, record + layout.payload_offset() + offset - meta,
                          meta + bytes, &b.full[k]);
      }
      ++j;
    }
    if (lane_ == 0) {
      for (int i = 0; i < pipe.num_bias; ++i)
        device::bulk_load(unit + int64_t(c_.num_ranks) * pipe.recv_slot_bytes + int64_t(i) * pipe.recv_piece_bytes,
                          reinterpret_cast<const char*>(i == 0 ? p_.bias0 : p_.bias1) +
                              int64_t(token) * layout.payload_bytes + offset,
                          bytes, &b.full[k]);
    }
    ++filled_;
    return true;
  }

  // Counts the oldest filled unit whose loads landed (blocking: waits for it). False when it gave up.
  __device__ bool retire(bool block) {
    StageBarriers& b = sh_.barriers;
    const uint32_t U = p_.pipeline.recv_units;
    while (retired_ < filled_) {
      const int k = static_cast<int>(retired_ % U);
      const uint32_t parity = use_parity(retired_, U);
      bool landed = false, ok = true;
      if (lane_ == 0) {
        landed = device::mbarrier_test_wait(&b.full[k], parity);
        if (!landed && block) ok = landed = wait_phase(&b.full[k], parity, c_, WaitSite{DevicePhase::kCombineRecv, c_.rank});
      }
      if (!__shfl_sync(~0u, ok, 0)) return false;
      if (!__shfl_sync(~0u, landed, 0)) return true;
      // A record is consumed when the unit with its last piece landed.
      const uint32_t from = __shfl_sync(~0u, lane_ == 0 ? sh_.sources[k] : 0u, 0);
      const int piece = __shfl_sync(~0u, lane_ == 0 ? sh_.piece[k] : 0, 0);
      if (piece == p_.pipeline.recv_pieces - 1 && ((from >> lane_) & 1u)) ++landed_;
      ++retired_;
      if (block) return true;
    }
    return true;
  }

  __device__ void return_heads() {
    const uint32_t batch = max(1u, static_cast<uint32_t>(c_.queues.queue_tokens) / 2);
    if (lane_ < c_.num_ranks && landed_ - returned_ >= batch) {
      device::fence_proxy_async_global();  // our bulk reads of the slots before the release
      device::store_release_sys(head_, pack_head(epoch_, landed_));
      returned_ = landed_;
    }
  }

  const CombineParams& p_;
  const NormalCommon& c_;
  int channel_;
  uint64_t epoch_;
  CombineShared& sh_;
  uint8_t* ring_;
  int lane_;
  const uint64_t* tail_;
  uint64_t* head_;
  uint32_t next_ = 0, published_ = 0, landed_ = 0, returned_ = 0;
  uint32_t filled_ = 0, retired_ = 0;  // units filled and retired
};

// acc[0..7] += the 8 bf16 values of v, in element order, with round-to-nearest float adds.
__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[8], const int4& v) {
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = __fadd_rn(acc[2 * i], __uint_as_float(words[i] << 16));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __uint_as_float(words[i] & 0xFFFF0000u));
  }
}

__device__ __forceinline__ int4 round_bf16x8(const float (&acc)[8]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    words[i] = uint32_t(numerics::float_to_bf16(acc[2 * i])) | uint32_t(numerics::float_to_bf16(acc[2 * i + 1])) << 16;
  return make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]), static_cast<int>(words[2]),
                   static_cast<int>(words[3]));
}

// Reduces unit k (landed) into its token's piece of combined_x (and, for the first piece, the weights).
__device__ void reduce_unit(const CombineParams& p, const CombineShared& sh, const uint8_t* unit, int k, int lane) {
  const CombinePipeline& pipe = p.pipeline;
  const RecordLayout& layout = p.common.record;
  const int token = sh.token[k], piece = sh.piece[k];
  const uint32_t from = sh.sources[k];
  const int n = __popc(from);
  const int64_t offset = int64_t(piece) * pipe.recv_piece_bytes;
  const int num_vectors = static_cast<int>(piece_size(layout.payload_bytes, pipe.recv_piece_bytes, piece) / 16);
  const uint8_t* rows = unit + layout.meta_bytes();  // slot j's piece at rows + j * slot bytes
  const uint8_t* bias = unit + int64_t(p.common.num_ranks) * pipe.recv_slot_bytes;
  char* out = reinterpret_cast<char*>(p.combined_x) + int64_t(token) * layout.payload_bytes + offset;

  for (int v = lane; v < num_vectors; v += kWarpSize) {
    int4 x[kMaxNvlRanks];
#pragma unroll
    for (int j = 0; j < kMaxNvlRanks; ++j)
      if (j < n) x[j] = *reinterpret_cast<const int4*>(rows + int64_t(j) * pipe.recv_slot_bytes + int64_t(v) * 16);
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < kMaxNvlRanks; ++j)
      if (j < n) accumulate_bf16x8(acc, x[j]);  // ascending source rank
    for (int i = 0; i < pipe.num_bias; ++i)
      accumulate_bf16x8(acc, *reinterpret_cast<const int4*>(bias + int64_t(i) * pipe.recv_piece_bytes + int64_t(v) * 16));
    device::store_16(out + int64_t(v) * 16, round_bf16x8(acc));
  }
  if (piece != 0) return;
  if (lane < n) {  // the record must be this token's: a cheap guard against protocol bugs
    const int4 header = *reinterpret_cast<const int4*>(unit + int64_t(lane) * pipe.recv_slot_bytes);
    if (header.x != token)
      device::report_error(p.common.errors, DeviceErrorKind::kProtocol, DevicePhase::kCombineRecv,
                           static_cast<int32_t>(__fns(from, 0, lane + 1)), header.x, token);
  }
  if (p.combined_weights != nullptr && lane < layout.num_topk) {
    float sum = 0.0f;
    for (int j = 0; j < n; ++j)
      sum = __fadd_rn(sum, *reinterpret_cast<const float*>(unit + int64_t(j) * pipe.recv_slot_bytes +
                                                            layout.weights_offset() + int64_t(lane) * 4));
    p.combined_weights[int64_t(token) * layout.num_topk + lane] = sum;
  }
}

// Reducer warp `reducer`: units reducer, reducer + W, ... of the channel (tokens x pieces of them).
__device__ void reduce_units(const CombineParams& p, int channel, CombineShared& sh, const uint8_t* ring, int reducer,
                             int lane) {
  const NormalCommon& c = p.common;
  const CombinePipeline& pipe = p.pipeline;
  StageBarriers& b = sh.barriers;
  const TokenRange range = channel_tokens(p.num_tokens, c.queues.num_channels, channel);
  const uint32_t U = pipe.recv_units, total = uint32_t(range.end - range.begin) * pipe.recv_pieces;
  for (uint32_t sequence = reducer; sequence < total; sequence += pipe.reducers) {
    const int k = static_cast<int>(sequence % U);
    if (!warp_wait_phase(&b.full[k], use_parity(sequence, U), c, WaitSite{DevicePhase::kCombineRecv, c.rank}, lane))
      return;
    reduce_unit(p, sh, ring + int64_t(k) * pipe.recv_unit_bytes, k, lane);
    __syncwarp();  // every lane's reads of the unit are done
    if (lane == 0) device::mbarrier_arrive(&b.empty[k]);
  }
}

__global__ void __launch_bounds__(kCombineThreads, 1) combine_kernel(const __grid_constant__ CombineParams p) {
  __shared__ CombineShared shared;
  extern __shared__ __align__(128) uint8_t combine_ring[];
  const NormalCommon& c = p.common;
  uint64_t epoch = 0;
  const bool proceed =
      enter_call(c, p.signature, handle_epoch(p.handle_meta, c.num_ranks), DevicePhase::kCombineSend, epoch);
  if (proceed) {
    if (threadIdx.x == 0) init_stage_barriers(shared.barriers, 1, 1);
    __syncthreads();
    const int channel = blockIdx.x / 2;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
    if (blockIdx.x % 2 == 0) {
      if (warp < c.num_ranks) {
        RowSender sender(p, channel, epoch, shared, combine_ring, warp, lane);
        sender.run();
      }
    } else if (warp == 0) {
      UnitLoader loader(p, channel, epoch, shared, combine_ring, lane);
      loader.run();
    } else if (warp - 1 < p.pipeline.reducers) {
      reduce_units(p, channel, shared, combine_ring, warp - 1, lane);
    }
    __syncthreads();
    if (threadIdx.x == 0) drain_stages(shared.barriers, c.timeout_ns);
  }
  finish_call(c, epoch);
}

}  // namespace
}  // namespace kernels

int prepare_combine_kernel(int max_shared_bytes) {
  cudaFuncAttributes attributes{};
  EPCOMM_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernels::combine_kernel));
  const int dynamic_bytes = max_shared_bytes - static_cast<int>(attributes.sharedSizeBytes);
  EPCOMM_CUDA_CHECK(
      cudaFuncSetAttribute(kernels::combine_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_bytes));
  return dynamic_bytes;
}

void launch_combine(const CombineParams& params, cudaStream_t stream) {
  kernels::combine_kernel<<<2 * params.common.queues.num_channels, kCombineThreads, params.pipeline.smem_bytes,
                            stream>>>(params);
  EPCOMM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace epcomm::cuda
