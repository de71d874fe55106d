// Dispatch (SPEC §3.2), fresh or cached: 2 C blocks, block 2c sends channel c, block 2c + 1 receives
// it. Channel c of a rank covers its tokens channel_tokens(T, C, c); a token's record goes to each of
// its destination ranks once, into the queue (this rank, c) in the destination's memory.
//
// Data moves with bulk copies (TMA) through stages in shared memory (kernels/pipeline.cuh,
// normal/pipelines.hpp); docs/CUDA_NORMAL_MODE.md argues the ordering and the progress of it all.
//
// Sender block. Producer warps stage the channel's routed tokens in order (token j of the sequence
// into stage j % S, by producer j % P): a bulk load of the payload from x, the meta part (scales,
// top-k) written by the lanes, the token's row in every destination. One store thread per
// destination (lane 0 of warp d) walks every stage in order; for a token routed to d it writes the
// 16-byte header into the next queue slot and bulk-stores the rest of the record from the stage, so a
// token is read from memory once however many ranks it goes to. A stage is free again when every
// store thread let go of it. A store thread publishes its tail when its bulk stores COMPLETED
// (wait_group, then fence.proxy.async + release at system scope), kPublishLag groups behind the
// newest, at least every chunk_tokens records, and always before it waits for ring space; the last
// publication carries the done bit.
//
// Receiver block. The loader warp (lane s follows source s) polls the tails in our memory and
// bulk-loads every published record, from any source, into the next stage; it returns a source's
// head (release) once half a queue of its records landed, and ends with one "no more" stage per
// writer. Writer warps take stages round-robin: a bulk store of the payload to its row of recv_x, the
// lanes write scales, top-k and the source index.
#include "core/cuda_check.hpp"
#include "cuda/kernels/common.cuh"
#include "cuda/kernels/pipeline.cuh"
#include "cuda/normal/launch.hpp"

namespace epcomm::cuda {
namespace kernels {
namespace {

// Bulk groups (records) a store thread leaves in flight when it publishes: it waits for the records
// stored kPublishLag before the newest, which have most likely landed already.
constexpr int kPublishLag = 4;
constexpr uint32_t kNoMoreTokens = 0x80000000u;  // sender stage: the channel has no more tokens
constexpr int32_t kNoMoreRecords = -1;           // receiver stage: the loader is done

// What the warps of a block tell each other about a stage, besides its data.
struct DispatchShared {
  StageBarriers barriers;
  uint32_t dests[kMaxStages];               // sender: ranks the staged token goes to, or kNoMoreTokens
  int32_t token[kMaxStages];                // sender: the staged token; receiver: source rank of the record
  int32_t rows[kMaxStages][kMaxNvlRanks];  // sender: the token's row in each destination's recv_x
};

// ---- sender ----------------------------------------------------------------------------------------

// A sender stage holds record bytes [16, record_bytes): meta part then payload.
__device__ __forceinline__ uint8_t* sender_stage(const DispatchParams& p, uint8_t* ring, int k) {
  return ring + int64_t(k) * p.pipeline.send_stage_bytes;
}

// The lanes write a token's scales, expert indices and weights into its stage.
__device__ void write_meta(const DispatchParams& p, uint8_t* stage, int token, int lane) {
  const RecordLayout& layout = p.common.record;
  if (p.x_scales != nullptr) {
    // Up to 4 scales per lane in flight; column-major scales are strided, but the M producers work on
    // neighbouring tokens, so most of these loads hit lines the others brought in.
    constexpr int kBatch = 4;
    auto* scales = reinterpret_cast<float*>(stage + layout.scales_offset() - 16);
    const float* source = p.x_scales + int64_t(token) * p.scale_stride_token;
    for (int first = 0; first < layout.num_scales; first += kBatch * kWarpSize) {
      float v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int s = first + u * kWarpSize + lane;
        if (s < layout.num_scales) v[u] = __ldg(source + int64_t(s) * p.scale_stride_scale);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int s = first + u * kWarpSize + lane;
        if (s < layout.num_scales) scales[s] = v[u];
      }
    }
  }
  if (lane < layout.num_topk) {
    // Values outside [0, E) travel as -1 (the routing kernel reported them).
    int64_t expert = load_topk(p.topk_idx, p.topk_is_int64 != 0, int64_t(token) * layout.num_topk + lane);
    if (expert < 0 || expert >= p.num_experts) expert = -1;
    reinterpret_cast<int32_t*>(stage + layout.idx_offset() - 16)[lane] = static_cast<int32_t>(expert);
    reinterpret_cast<float*>(stage + layout.weights_offset() - 16)[lane] =
        p.topk_weights != nullptr ? __ldg(p.topk_weights + int64_t(token) * layout.num_topk + lane) : 0.0f;
  }
}

// A producer warp stages token `token` as number `sequence` of the channel's routed tokens. Lane d
// < R passes the token's row in rank d (or -1 when it does not go there).
__device__ bool stage_token(const DispatchParams& p, DispatchShared& sh, uint8_t* ring, uint32_t sequence, int token,
                            uint32_t dests, int32_t row, int lane) {
  const NormalCommon& c = p.common;
  const RecordLayout& layout = c.record;
  StageBarriers& b = sh.barriers;
  const uint32_t S = p.pipeline.send_stages;
  const int k = static_cast<int>(sequence % S);
  const WaitSite site{DevicePhase::kDispatchSend, c.rank};
  if (sequence >= S && !warp_wait_phase(&b.empty[k], use_parity(sequence - S, S), c, site, lane)) return false;
  uint8_t* stage = sender_stage(p, ring, k);
  if (lane == 0) {
    // Announce the payload first, arrive after the meta part is written (one arrival per phase).
    device::mbarrier_expect_tx(&b.full[k], static_cast<uint32_t>(layout.payload_bytes));
    device::bulk_load(stage + layout.payload_offset() - 16, p.x + int64_t(token) * layout.payload_bytes,
                      static_cast<uint32_t>(layout.payload_bytes), &b.full[k]);
    b.armed[k] = sequence / S + 1;
    sh.dests[k] = dests;
    sh.token[k] = token;
  }
  if (lane < c.num_ranks) {
    sh.rows[k][lane] = row;
    if (!p.cached && row >= 0) p.send_row[int64_t(token) * c.num_ranks + lane] = row;
  }
  write_meta(p, stage, token, lane);
  device::fence_proxy_async_shared();  // our generic writes to the stage before the bulk stores read it
  __syncwarp();
  if (lane == 0) device::mbarrier_arrive(&b.full[k]);
  return true;
}

// The stage after the channel's last token says so (no data).
__device__ void stage_end_of_tokens(const DispatchParams& p, DispatchShared& sh, uint32_t sequence, int lane) {
  const NormalCommon& c = p.common;
  StageBarriers& b = sh.barriers;
  const uint32_t S = p.pipeline.send_stages;
  const int k = static_cast<int>(sequence % S);
  if (sequence >= S &&
      !warp_wait_phase(&b.empty[k], use_parity(sequence - S, S), c, WaitSite{DevicePhase::kDispatchSend, c.rank}, lane))
    return;
  if (lane == 0) {
    sh.dests[k] = kNoMoreTokens;
    b.armed[k] = sequence / S + 1;
    device::mbarrier_arrive(&b.full[k]);
  }
}

// Producer warp `producer`: walks the channel's tokens 32 at a time and stages routed token number j
// when j % producers == producer (so stage k is always filled by producer k % producers).
__device__ void produce_tokens(const DispatchParams& p, int channel, DispatchShared& sh, uint8_t* ring, int producer,
                               int lane) {
  const NormalCommon& c = p.common;
  const int R = c.num_ranks, me = c.rank;
  const uint32_t producers = static_cast<uint32_t>(p.pipeline.producers);
  const TokenRange range = channel_tokens(p.num_tokens, c.queues.num_channels, channel);
  // Lane d < R (fresh dispatch): the row in rank d of this channel's next token that goes to rank d.
  int32_t next_row = 0;
  if (!p.cached && lane < R)
    next_row = (me == 0 ? 0 : p.rank_prefix_matrix[(me - 1) * R + lane]) + c.state->channel_prefix[channel][lane];
  uint32_t sequence = 0;  // routed tokens of the channel before this window
  for (int window = range.begin; window < range.end; window += kWarpSize) {
    const int t = window + lane;
    uint32_t dests = 0;
    if (t < range.end)
      for (int d = 0; d < R; ++d) dests |= uint32_t(p.in_rank[int64_t(t) * R + d] != 0) << d;
    const uint32_t routed = __ballot_sync(~0u, dests != 0);
    uint32_t to_mine = 0;  // lane d: the window's tokens that go to rank d
    for (int d = 0; d < R; ++d) {
      const uint32_t ballot = __ballot_sync(~0u, (dests >> d) & 1u);
      if (lane == d) to_mine = ballot;
    }
    const int n = __popc(routed);
    for (int i = 0; i < n; ++i) {
      if ((sequence + i) % producers != static_cast<uint32_t>(producer)) continue;
      const int position = static_cast<int>(__fns(routed, 0, i + 1));
      const int token = window + position;
      const uint32_t token_dests = __shfl_sync(~0u, dests, position);
      int32_t row = -1;
      if (lane < R && ((token_dests >> lane) & 1u))
        row = p.cached ? p.send_row[int64_t(token) * R + lane]
                       : next_row + __popc(to_mine & ((1u << position) - 1u));
      if (!stage_token(p, sh, ring, sequence + i, token, token_dests, row, lane)) return;
    }
    sequence += n;
    next_row += __popc(to_mine);
  }
  if (sequence % producers == static_cast<uint32_t>(producer)) stage_end_of_tokens(p, sh, sequence, lane);
}

// Lane 0 of warp `dst`: stores every staged token that goes to rank `dst` into the queue (this rank,
// channel) in dst's memory, in stage order, and publishes them.
__device__ void send_to_rank(const DispatchParams& p, int channel, uint64_t epoch, DispatchShared& sh,
                             const uint8_t* ring, int dst) {
  const NormalCommon& c = p.common;
  StageBarriers& b = sh.barriers;
  const uint32_t S = p.pipeline.send_stages, Q = static_cast<uint32_t>(c.queues.queue_tokens);
  const int64_t record_bytes = c.queues.record_bytes;
  char* queue = c.peers[dst] + c.queues.queue_offset(c.rank, channel);
  uint64_t* tail = at_offset<uint64_t>(c.peers[dst], tail_offset(c.rank, channel));
  const uint64_t* head = at_offset<const uint64_t>(c.peers[c.rank], head_offset(dst, channel));
  const WaitSite site{DevicePhase::kDispatchSend, dst};

  uint32_t stored = 0, published = 0, freed = 0;  // records: bulk stores issued, published, consumed (head)
  int held = -1;  // the stage of the newest bulk store, which may still be reading it
  auto release_held = [&] {
    if (held < 0) return;
    device::bulk_wait_read<0>();
    device::mbarrier_arrive(&b.empty[held]);
    held = -1;
  };
  // After a bulk_wait: the records below `count` completed, their writes visible to this thread.
  auto publish = [&](uint32_t count, bool done) {
    device::fence_proxy_async_global();
    if (!device::aborted(c.errors)) device::store_release_sys(tail, pack_tail(epoch, count, done));
    published = count;
  };

  bool ok = true;
  for (uint32_t sequence = 0;; ++sequence) {
    const int k = static_cast<int>(sequence % S);
    const uint32_t parity = use_parity(sequence, S);
    if (!device::mbarrier_try_wait(&b.full[k], parity)) {
      release_held();  // never sit on a stage while waiting for another: the producers may need it
      if (!wait_phase(&b.full[k], parity, c, site)) {
        ok = false;
        break;
      }
    }
    const uint32_t dests = sh.dests[k];
    if (dests == kNoMoreTokens) break;
    if (((dests >> dst) & 1u) == 0) {
      device::mbarrier_arrive(&b.empty[k]);
      continue;
    }
    if (stored >= freed + Q) {  // the ring in dst is full: publish everything, wait for the receiver
      release_held();
      device::bulk_wait<0>();
      publish(stored, false);
      ok = device::wait_until(
          [&] {
            freed = count_of(device::load_acquire_sys(head), epoch);
            return stored < freed + Q;
          },
          c.timeout_ns, c.errors, site);
      if (!ok) break;
      device::fence_proxy_async_global();  // the receiver's reads of the slots before our bulk writes
    }
    char* slot = queue + int64_t(stored % Q) * record_bytes;
    device::store_16(slot, make_int4(sh.rows[k][dst], sh.token[k], 0, 0));
    device::bulk_store(slot + 16, ring + int64_t(k) * p.pipeline.send_stage_bytes,
                       static_cast<uint32_t>(record_bytes - 16));
    device::bulk_commit();
    ++stored;
    if (held >= 0) {  // the previous store has read its stage once at most the newest group is pending
      device::bulk_wait_read<1>();
      device::mbarrier_arrive(&b.empty[held]);
    }
    held = k;
    if (stored >= published + static_cast<uint32_t>(c.chunk_tokens) + kPublishLag) {
      device::bulk_wait<kPublishLag>();
      publish(stored - kPublishLag, false);
    }
  }
  release_held();
  device::bulk_wait<0>();
  if (ok) publish(stored, true);
}

__device__ void dispatch_send(const DispatchParams& p, int channel, uint64_t epoch, DispatchShared& sh,
                              uint8_t* ring) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int R = p.common.num_ranks;
  if (warp < R) {
    if (lane == 0) send_to_rank(p, channel, epoch, sh, ring, warp);
  } else if (warp - R < p.pipeline.producers) {
    produce_tokens(p, channel, sh, ring, warp - R, lane);
  }
}

// ---- receiver --------------------------------------------------------------------------------------

// Writes one received record (in a stage) out: payload by a bulk store (lane 0), the rest by the lanes.
__device__ void write_record(const DispatchParams& p, const uint8_t* stage, int source, int lane) {
  const RecordLayout& layout = p.common.record;
  const int4 header = *reinterpret_cast<const int4*>(stage);
  const int32_t row = header.x, token = header.y;
  if (row < 0 || row >= p.num_rows) {
    // With num_worst_tokens, rows past the capacity are dropped (notify reported kCapacity).
    const bool dropped = p.drop_overflow != 0 && row >= p.num_rows;
    if (!dropped && lane == 0)
      device::report_error(p.common.errors, DeviceErrorKind::kProtocol, DevicePhase::kDispatchRecv, source, row, token);
    return;
  }
  if (lane == 0) {
    device::bulk_store(p.recv_x + int64_t(row) * layout.payload_bytes, stage + layout.payload_offset(),
                       static_cast<uint32_t>(layout.payload_bytes));
    device::bulk_commit();
  }
  if (p.recv_scales != nullptr) {
    const auto* scales = reinterpret_cast<const float*>(stage + layout.scales_offset());
    for (int s = lane; s < layout.num_scales; s += kWarpSize) {
      const int64_t at = p.scales_column_major ? int64_t(s) * p.num_rows + row : int64_t(row) * layout.num_scales + s;
      p.recv_scales[at] = scales[s];
    }
  }
  if (lane < layout.num_topk && p.recv_topk_idx != nullptr) {
    const int32_t expert = reinterpret_cast<const int32_t*>(stage + layout.idx_offset())[lane];
    const int32_t local = expert - p.common.rank * p.num_local_experts;
    const bool kept = expert >= 0 && local >= 0 && local < p.num_local_experts;
    const int64_t at = int64_t(row) * layout.num_topk + lane;
    p.recv_topk_idx[at] = kept ? local : -1;
    if (p.recv_topk_weights != nullptr)
      p.recv_topk_weights[at] = kept ? reinterpret_cast<const float*>(stage + layout.weights_offset())[lane] : 0.0f;
  }
  if (lane == 0 && p.recv_src_idx != nullptr) p.recv_src_idx[row] = token;
}

// num_worst_tokens: the rows past the real count (this block's share) say "no expert".
__device__ void fill_empty_rows(const DispatchParams& p, int channel) {
  const NormalCommon& c = p.common;
  const int R = c.num_ranks;
  const int32_t real = min(p.rank_prefix_matrix[(R - 1) * R + c.rank], p.num_rows);
  const int K = c.record.num_topk;
  const int stride = c.queues.num_channels * blockDim.x;
  for (int row = real + channel * blockDim.x + threadIdx.x; row < p.num_rows; row += stride) {
    for (int k = 0; k < K; ++k) {
      if (p.recv_topk_idx != nullptr) p.recv_topk_idx[int64_t(row) * K + k] = -1;
      if (p.recv_topk_weights != nullptr) p.recv_topk_weights[int64_t(row) * K + k] = 0.0f;
    }
    if (p.recv_src_idx != nullptr) p.recv_src_idx[row] = -1;
  }
}

// The receiver's loader warp. Lane s < R follows source s: records it published (tail), loaded
// (bulk load issued), landed (load complete: the slot is free), returned (head sent back).
class RecordLoader {
 public:
  __device__ RecordLoader(const DispatchParams& p, int channel, uint64_t epoch, DispatchShared& sh, uint8_t* ring,
                          int lane)
      : p_(p), c_(p.common), channel_(channel), epoch_(epoch), sh_(sh), ring_(ring), lane_(lane) {
    const int me = c_.rank;
    follows_ = lane < c_.num_ranks;
    const int source = follows_ ? lane : 0;
    tail_ = at_offset<const uint64_t>(c_.peers[me], tail_offset(source, channel));
    head_ = at_offset<uint64_t>(c_.peers[source], head_offset(me, channel));
    done_ = !follows_;
  }

  // Loads everything every source publishes, then hands every writer its "no more" stage.
  __device__ void run() {
    IdleClock idle;
    while (true) {
      if (!load_published()) return;
      retire(/*block=*/false);
      return_heads();
      if (__all_sync(~0u, done_ && loaded_ == published_)) break;
      if (poll_tails()) {
        idle.progress();
        continue;
      }
      const IdleClock::Verdict verdict = idle.idle(c_);
      if (verdict == IdleClock::kAborted) return;
      if (verdict == IdleClock::kTimedOut) {
        const uint32_t waiting = __ballot_sync(~0u, !done_);
        if (lane_ == 0)
          device::report_error(c_.errors, DeviceErrorKind::kTimeout, DevicePhase::kDispatchRecv, __ffs(waiting) - 1,
                               static_cast<int64_t>(c_.timeout_ns));
        return;
      }
    }
    for (int w = 0; w < p_.pipeline.writers; ++w)
      if (!fill_stage(kNoMoreRecords, nullptr)) return;
  }

 private:
  // Bulk-loads every record published but not loaded yet, source by source.
  __device__ bool load_published() {
    for (int s = 0; s < c_.num_ranks; ++s) {
      const uint32_t from = __shfl_sync(~0u, loaded_, s), to = __shfl_sync(~0u, published_, s);
      const char* queue = c_.peers[c_.rank] + c_.queues.queue_offset(s, channel_);
      const uint32_t Q = static_cast<uint32_t>(c_.queues.queue_tokens);
      for (uint32_t i = from; i < to; ++i)
        if (!fill_stage(s, queue + int64_t(i % Q) * c_.queues.record_bytes)) return false;
      if (lane_ == s) loaded_ = to;
    }
    return true;
  }

  // The next stage gets the record at `record` from `source` (or says "no more" when source < 0).
  __device__ bool fill_stage(int source, const char* record) {
    StageBarriers& b = sh_.barriers;
    const uint32_t S = p_.pipeline.recv_stages, sequence = filled_;
    const int k = static_cast<int>(sequence % S);
    if (sequence >= S) {  // the stage's previous record must have landed and been written out
      while (retired_ <= sequence - S)
        if (!retire(/*block=*/true)) return false;
      if (!warp_wait_phase(&b.empty[k], use_parity(sequence - S, S), c_, WaitSite{DevicePhase::kDispatchRecv, c_.rank},
                           lane_))
        return false;
    }
    if (lane_ == 0) {
      sh_.token[k] = source;
      b.armed[k] = sequence / S + 1;
      if (source >= 0) {
        const uint32_t bytes = static_cast<uint32_t>(c_.queues.record_bytes);
        device::mbarrier_arrive_expect_tx(&b.full[k], bytes);
        device::bulk_load(ring_ + int64_t(k) * p_.pipeline.recv_stage_bytes, record, bytes, &b.full[k]);
      } else {
        device::mbarrier_arrive(&b.full[k]);
      }
    }
    ++filled_;
    return true;
  }

  // Counts the oldest filled stage whose load landed (blocking: waits for it). False when it gave up.
  __device__ bool retire(bool block) {
    StageBarriers& b = sh_.barriers;
    const uint32_t S = p_.pipeline.recv_stages;
    while (retired_ < filled_) {
      const int k = static_cast<int>(retired_ % S);
      const uint32_t parity = use_parity(retired_, S);
      bool landed = false, ok = true;
      if (lane_ == 0) {
        landed = device::mbarrier_test_wait(&b.full[k], parity);
        if (!landed && block) ok = landed = wait_phase(&b.full[k], parity, c_, WaitSite{DevicePhase::kDispatchRecv, c_.rank});
      }
      if (!__shfl_sync(~0u, ok, 0)) return false;
      if (!__shfl_sync(~0u, landed, 0)) return true;
      const int source = __shfl_sync(~0u, lane_ == 0 ? sh_.token[k] : 0, 0);
      if (lane_ == source) ++landed_;
      ++retired_;
      if (block) return true;
    }
    return true;
  }

  // A source gets its head back once half a queue of its records landed: a sender that waits for
  // space has published a whole queue, so this always comes (see the doc), and it costs one release
  // per half queue.
  __device__ void return_heads() {
    const uint32_t batch = max(1u, static_cast<uint32_t>(c_.queues.queue_tokens) / 2);
    if (follows_ && landed_ - returned_ >= batch) {
      device::fence_proxy_async_global();  // our bulk reads of the slots before the release
      device::store_release_sys(head_, pack_head(epoch_, landed_));
      returned_ = landed_;
    }
  }

  // Lanes whose source has nothing left to load look at its tail. True when some tail moved.
  __device__ bool poll_tails() {
    bool moved = false;
    if (follows_ && !done_ && loaded_ == published_) {
      const uint64_t seen = device::load_acquire_sys(tail_);
      const uint32_t count = count_of(seen, epoch_);
      if (count > published_) {
        published_ = count;
        moved = true;
      }
      if (done_of(seen, epoch_)) {
        done_ = true;
        moved = true;
      }
    }
    __syncwarp();
    if (lane_ == 0) device::fence_proxy_async_global();  // the acquires above before our next bulk loads
    return __any_sync(~0u, moved);
  }

  const DispatchParams& p_;
  const NormalCommon& c_;
  int channel_;
  uint64_t epoch_;
  DispatchShared& sh_;
  uint8_t* ring_;
  int lane_;
  bool follows_;
  const uint64_t* tail_;
  uint64_t* head_;
  uint32_t published_ = 0, loaded_ = 0, landed_ = 0, returned_ = 0;
  bool done_;
  uint32_t filled_ = 0, retired_ = 0;  // stages filled and retired (all sources)
};

// Writer warp `writer`: stages writer, writer + W, ... until a "no more" stage.
__device__ void write_records(const DispatchParams& p, DispatchShared& sh, const uint8_t* ring, int writer, int lane) {
  const NormalCommon& c = p.common;
  StageBarriers& b = sh.barriers;
  const uint32_t S = p.pipeline.recv_stages, W = p.pipeline.writers;
  for (uint32_t sequence = writer;; sequence += W) {
    const int k = static_cast<int>(sequence % S);
    if (!warp_wait_phase(&b.full[k], use_parity(sequence, S), c, WaitSite{DevicePhase::kDispatchRecv, c.rank}, lane))
      break;
    const int source = sh.token[k];
    if (source == kNoMoreRecords) break;
    write_record(p, ring + int64_t(k) * p.pipeline.recv_stage_bytes, source, lane);
    __syncwarp();  // every lane's reads of the stage are done
    if (lane == 0) {
      device::bulk_wait_read<0>();
      device::mbarrier_arrive(&b.empty[k]);
    }
  }
  if (lane == 0) device::bulk_wait<0>();
}

__device__ void dispatch_receive(const DispatchParams& p, int channel, uint64_t epoch, DispatchShared& sh,
                                 uint8_t* ring) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (warp == 0) {
    RecordLoader loader(p, channel, epoch, sh, ring, lane);
    loader.run();
  } else if (warp - 1 < p.pipeline.writers) {
    write_records(p, sh, ring, warp - 1, lane);
  }
}

__global__ void __launch_bounds__(kDispatchThreads, 1) dispatch_kernel(const __grid_constant__ DispatchParams p) {
  __shared__ DispatchShared shared;
  __shared__ int proceed_flag;
  extern __shared__ __align__(128) uint8_t dispatch_ring[];
  const NormalCommon& c = p.common;
  uint64_t epoch = 0;
  bool proceed;
  if (p.cached) {
    proceed = enter_call(c, p.signature, handle_epoch(p.handle_meta, c.num_ranks), DevicePhase::kDispatchSend, epoch);
  } else {  // notify entered the call already
    epoch = read_epoch(c.state);
    if (threadIdx.x == 0) proceed_flag = device::load_volatile(&c.state->skip) == 0 && !device::aborted(c.errors);
    __syncthreads();
    proceed = proceed_flag != 0;
  }
  const int channel = blockIdx.x / 2;
  const bool sender = blockIdx.x % 2 == 0;
  if (proceed) {
    // Sender: every store thread lets go of every stage; receiver: one writer.
    if (threadIdx.x == 0) init_stage_barriers(shared.barriers, 1, sender ? c.num_ranks : 1);
    if (!sender && p.fill_empty_rows) fill_empty_rows(p, channel);
    __syncthreads();
    if (sender)
      dispatch_send(p, channel, epoch, shared, dispatch_ring);
    else
      dispatch_receive(p, channel, epoch, shared, dispatch_ring);
    __syncthreads();
    if (threadIdx.x == 0) drain_stages(shared.barriers, c.timeout_ns);
  }
  if (p.cached) finish_call(c, epoch);
}

}  // namespace
}  // namespace kernels

int prepare_dispatch_kernel(int max_shared_bytes) {
  cudaFuncAttributes attributes{};
  EPCOMM_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernels::dispatch_kernel));
  const int dynamic_bytes = max_shared_bytes - static_cast<int>(attributes.sharedSizeBytes);
  EPCOMM_CUDA_CHECK(
      cudaFuncSetAttribute(kernels::dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_bytes));
  return dynamic_bytes;
}

void launch_dispatch(const DispatchParams& params, cudaStream_t stream) {
  kernels::dispatch_kernel<<<2 * params.common.queues.num_channels, kDispatchThreads, params.pipeline.smem_bytes,
                             stream>>>(params);
  EPCOMM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace epcomm::cuda
