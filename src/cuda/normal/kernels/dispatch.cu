// Dispatch (SPEC §3.2), fresh or cached: 2 C blocks, block 2c sends channel c, block 2c + 1 receives
// it. Channel c of a rank covers its tokens channel_tokens(T, C, c); a token's record goes to each of
// its destination ranks once, into the queue (this rank, c) in the destination's memory.
//
// Sender block: the warps form one group per destination rank. A group walks the channel's tokens in
// order, 32 at a time (a ballot over is_token_in_rank picks those for its destination) and hands
// each record to its QueueSender (common.cuh): record j of the queue is written by warp j % W of the
// group, 16-byte stores straight into the peer's memory, published per chunk_tokens records
// (release), ring space awaited on the head the receiver writes into OUR memory (acquire). The last
// publication carries the done bit.
//
// Receiver block: one group per source rank. The group's first thread polls the tail in our memory
// (acquire), the group copies every published record to its row (the row travels in the record:
// the sender knows it from rank_prefix_matrix and its channel prefix, or from the handle's send_row),
// then the first thread returns the head to the sender (release) — one round trip per batch of
// records, not per token.
#include "cuda/device/launch.hpp"
#include "cuda/normal/kernels/common.cuh"
#include "cuda/normal/launch.hpp"

namespace epcomm::cuda {
namespace kernels {
namespace {

constexpr uint64_t kStopped = ~uint64_t(0);

// One token's record, written by one warp into a queue slot (the slot may be in a peer's memory).
// The small loads (top-k, weights, the first scales) are issued before the payload copy so that
// their latency overlaps it instead of adding a round trip per record.
__device__ void write_record(const DispatchParams& p, char* slot, int token, int32_t row, int lane) {
  const RecordLayout& layout = p.common.record;
  int32_t expert = -1;
  float weight = 0.0f;
  if (lane < layout.num_topk) {
    // Values outside [0, E) travel as -1 (the routing kernel reported them).
    const int64_t value = load_topk(p.topk_idx, p.topk_is_int64 != 0, int64_t(token) * layout.num_topk + lane);
    expert = value >= 0 && value < p.num_experts ? static_cast<int32_t>(value) : -1;
    if (p.topk_weights != nullptr) weight = __ldg(p.topk_weights + int64_t(token) * layout.num_topk + lane);
  }
  const float* scale_source = p.x_scales + int64_t(token) * p.scale_stride_token;
  const bool has_scales = p.x_scales != nullptr;
  const float first_scale =
      has_scales && lane < layout.num_scales ? __ldg(scale_source + int64_t(lane) * p.scale_stride_scale) : 0.0f;
  if (lane == 0) device::store_16(slot, make_int4(row, token, 0, 0));
  warp_copy_from_input<kCopyUnroll>(slot + layout.payload_offset(),
                                    reinterpret_cast<const char*>(p.x) + int64_t(token) * layout.payload_bytes,
                                    layout.payload_bytes / 16, lane);
  if (has_scales) {
    auto* scales = reinterpret_cast<float*>(slot + layout.scales_offset());
    if (lane < layout.num_scales) scales[lane] = first_scale;
    for (int s = lane + kWarpSize; s < layout.num_scales; s += kWarpSize)
      scales[s] = __ldg(scale_source + int64_t(s) * p.scale_stride_scale);
  }
  if (lane < layout.num_topk) {
    reinterpret_cast<int32_t*>(slot + layout.idx_offset())[lane] = expert;
    reinterpret_cast<float*>(slot + layout.weights_offset())[lane] = weight;
  }
}

__device__ void dispatch_send(const DispatchParams& p, int channel, uint64_t epoch) {
  send_channel(p.common, channel, epoch, DevicePhase::kDispatchSend, [&](QueueSender& sender) {
    const NormalCommon& c = p.common;
    const int R = c.num_ranks, me = c.rank, dst = sender.g.peer, lane = sender.g.lane;
    const TokenRange range = channel_tokens(p.num_tokens, c.queues.num_channels, channel);
    const int32_t first_row =
        p.cached ? 0 : (me == 0 ? 0 : p.rank_prefix_matrix[(me - 1) * R + dst]) + c.state->channel_prefix[channel][dst];

    uint32_t next = 0;  // records written (by all warps of the group)
    for (int window = range.begin; window < range.end; window += kWarpSize) {
      const int t = window + lane;
      const bool routed = t < range.end && p.in_rank[int64_t(t) * R + dst] != 0;
      const uint32_t mask = __ballot_sync(~0u, routed);
      const int n = __popc(mask);
      for (int j = 0; j < n; ++j, ++next) {
        char* slot = sender.claim(next);
        if (slot == nullptr) continue;
        const int token = window + static_cast<int>(__fns(mask, 0, j + 1));
        const int32_t row = p.cached ? p.send_row[int64_t(token) * R + dst] : first_row + static_cast<int32_t>(next);
        write_record(p, slot, token, row, lane);
        if (!p.cached && lane == 0) p.send_row[int64_t(token) * R + dst] = row;
      }
    }
    sender.finish(next);
  });
}

// Copies one received record to its row.
__device__ void read_record(const DispatchParams& p, const char* slot, int source, int lane) {
  const RecordLayout& layout = p.common.record;
  const int4 header = device::load_cg_16(slot);
  const int32_t row = header.x, token = header.y;
  if (row < 0 || row >= p.num_rows) {
    // With num_worst_tokens, rows past the capacity are dropped (notify reported kCapacity).
    const bool dropped = p.drop_overflow != 0 && row >= p.num_rows;
    if (!dropped && lane == 0)
      device::report_error(p.common.errors, DeviceErrorKind::kProtocol, DevicePhase::kDispatchRecv, source, row, token);
    return;
  }
  warp_copy_from_queue<kCopyUnroll>(reinterpret_cast<char*>(p.recv_x) + int64_t(row) * layout.payload_bytes,
                                    slot + layout.payload_offset(), layout.payload_bytes / 16, lane);
  if (p.recv_scales != nullptr) {
    const auto* scales = reinterpret_cast<const float*>(slot + layout.scales_offset());
    for (int s = lane; s < layout.num_scales; s += kWarpSize) {
      const int64_t at = p.scales_column_major ? int64_t(s) * p.num_rows + row : int64_t(row) * layout.num_scales + s;
      p.recv_scales[at] = __ldcg(scales + s);
    }
  }
  if (lane < layout.num_topk && p.recv_topk_idx != nullptr) {
    const int32_t expert = __ldcg(reinterpret_cast<const int32_t*>(slot + layout.idx_offset()) + lane);
    const int32_t local = expert - p.common.rank * p.num_local_experts;
    const bool kept = expert >= 0 && local >= 0 && local < p.num_local_experts;
    const int64_t at = int64_t(row) * layout.num_topk + lane;
    p.recv_topk_idx[at] = kept ? local : -1;
    if (p.recv_topk_weights != nullptr)
      p.recv_topk_weights[at] =
          kept ? __ldcg(reinterpret_cast<const float*>(slot + layout.weights_offset()) + lane) : 0.0f;
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

__device__ void dispatch_receive(const DispatchParams& p, int channel, uint64_t epoch) {
  __shared__ uint64_t seen_tails[kMaxNvlRanks];
  const NormalCommon& c = p.common;
  const int R = c.num_ranks, me = c.rank;
  const WarpGroup g = make_group(R);
  if (g.peer >= R) return;
  const int source = g.peer;
  const uint32_t Q = static_cast<uint32_t>(c.queues.queue_tokens);
  const char* queue = c.peers[me] + c.queues.queue_offset(source, channel);
  const uint64_t* tail = at_offset<const uint64_t>(c.peers[me], tail_offset(source, channel));
  uint64_t* head = at_offset<uint64_t>(c.peers[source], head_offset(me, channel));
  volatile uint64_t* shared_tail = &seen_tails[source];

  uint32_t consumed = 0;
  while (true) {
    if (g.leader()) {
      uint64_t seen = 0;
      const bool ok = device::wait_or_report(
          tail, [&](uint64_t value) { return count_of(value, epoch) > consumed || done_of(value, epoch); }, seen,
          c.timeout_ns, c.errors, WaitSite{DevicePhase::kDispatchRecv, source});
      *shared_tail = ok ? seen : kStopped;
    }
    g.sync();  // the leader's acquire is ordered before every warp's reads of the slots
    const uint64_t seen = *shared_tail;
    if (seen == kStopped) break;
    const uint32_t count = count_of(seen, epoch);
    for (uint32_t i = consumed + g.index; i < count; i += g.num_warps)
      read_record(p, queue + int64_t(i % Q) * c.queues.record_bytes, source, g.lane);
    consumed = count;
    g.sync();  // every read of the freed slots is done
    if (g.leader()) device::store_release_sys(head, pack_head(epoch, consumed));
    if (done_of(seen, epoch)) break;
  }
}

__global__ void __launch_bounds__(kDispatchThreads, 1) dispatch_kernel(const __grid_constant__ DispatchParams p) {
  const NormalCommon& c = p.common;
  uint64_t epoch = 0;
  bool proceed;
  if (p.cached) {
    proceed = enter_call(c, p.signature, handle_epoch(p.handle_meta, c.num_ranks), DevicePhase::kDispatchSend, epoch);
  } else {  // notify entered the call already
    epoch = read_epoch(c.state);
    proceed = device::load_volatile(&c.state->skip) == 0 && !device::aborted(c.errors);
  }
  const int channel = blockIdx.x / 2;
  if (proceed) {
    if (blockIdx.x % 2 == 0) {
      dispatch_send(p, channel, epoch);
    } else {
      if (p.fill_empty_rows) fill_empty_rows(p, channel);
      dispatch_receive(p, channel, epoch);
    }
  }
  if (p.cached) finish_call(c, epoch);
}

}  // namespace
}  // namespace kernels

void launch_dispatch(const DispatchParams& params, cudaStream_t stream) {
  launch_kernel(kernels::dispatch_kernel, 2 * params.common.queues.num_channels, kDispatchThreads, 0, stream,
                /*overlap_previous=*/false, params);
}

}  // namespace epcomm::cuda
