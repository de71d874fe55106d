// Combine (SPEC §3.3): the reverse of dispatch. 2 C blocks: block 2c sends channel c, block 2c + 1
// receives it; channel c covers the same token range of each source rank as in dispatch's split
// (with this call's C), so the records a rank gets from one peer on one channel arrive in token order.
//
// Sender block (groups per destination rank s): the rows this rank received from s are sorted by
// source token, so channel c's rows are one contiguous run, found by binary search in recv_src_idx.
// They go, in order, into the queue (this rank, c) in s's memory through the QueueSender dispatch
// uses too (common.cuh), published per chunk.
//
// Receiver block: windows of `window_tokens` tokens. For each window the block computes, per peer,
// which tokens it sends (is_token_in_rank) and where each sits in that peer's queue (a prefix count);
// then warps take tokens round-robin, wait until the records are published, and reduce them:
//   acc = 0.0f; for r ascending: acc += float(row_r); acc += bias_0; acc += bias_1; out = bf16_rn(acc)
// with __fadd_rn (never contracted) and numerics::float_to_bf16, bit-identical to the CPU reference.
// At the window's end the heads go back to the senders. window_tokens <= Q - chunk + 1 keeps a window
// within what the senders can have published, so the window always completes.
#include "core/numerics.hpp"
#include "cuda/device/launch.hpp"
#include "cuda/normal/kernels/common.cuh"
#include "cuda/normal/launch.hpp"

namespace epcomm::cuda {
namespace kernels {
namespace {

constexpr int kMaxWindowTokens = 128;
constexpr int kWindowWords = kMaxWindowTokens / kWarpSize;

__device__ void write_record(const CombineParams& p, char* slot, int32_t row, int lane) {
  const RecordLayout& layout = p.common.record;
  if (lane == 0) device::store_16(slot, make_int4(p.recv_src_idx[row], row, 0, 0));
  warp_copy_from_input<kCopyUnroll>(slot + layout.payload_offset(),
                                    reinterpret_cast<const char*>(p.x) + int64_t(row) * layout.payload_bytes,
                                    layout.payload_bytes / 16, lane);
  if (lane < layout.num_topk)
    reinterpret_cast<float*>(slot + layout.weights_offset())[lane] =
        p.topk_weights != nullptr ? __ldg(p.topk_weights + int64_t(row) * layout.num_topk + lane) : 0.0f;
}

__device__ void combine_send(const CombineParams& p, int channel, uint64_t epoch) {
  send_channel(p.common, channel, epoch, DevicePhase::kCombineSend, [&](QueueSender& sender) {
    const int R = p.common.num_ranks, me = p.common.rank, dst = sender.g.peer, lane = sender.g.lane;
    // Rows from `dst` are [first, last); channel c's tokens of dst are [range.begin, range.end).
    const int first = min(dst == 0 ? 0 : p.rank_prefix_matrix[(dst - 1) * R + me], p.num_recv_rows);
    const int last = min(p.rank_prefix_matrix[dst * R + me], p.num_recv_rows);
    const TokenRange range = channel_tokens(p.handle_meta[dst], p.common.queues.num_channels, channel);
    const int begin = warp_lower_bound(p.recv_src_idx, first, last, range.begin, lane);
    const int end = warp_lower_bound(p.recv_src_idx, begin, last, range.end, lane);
    const uint32_t num_records = static_cast<uint32_t>(end - begin);

    for (uint32_t next = 0; next < num_records; ++next)
      if (char* slot = sender.claim(next)) write_record(p, slot, begin + static_cast<int32_t>(next), lane);
    sender.finish(num_records);
  });
}

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

// Reduces one token whose records sit at `slots[r]` (for r in `present`) into combined_x[token].
__device__ void reduce_token(const CombineParams& p, int token, uint32_t present,
                             const char* const (&slots)[kMaxNvlRanks], int lane) {
  const RecordLayout& layout = p.common.record;
  const int num_vectors = layout.payload_bytes / 16;
  const int64_t row_offset = int64_t(token) * layout.payload_bytes;
  const char* bias0 = p.bias0 != nullptr ? reinterpret_cast<const char*>(p.bias0) + row_offset : nullptr;
  const char* bias1 = p.bias1 != nullptr ? reinterpret_cast<const char*>(p.bias1) + row_offset : nullptr;
  char* out = reinterpret_cast<char*>(p.combined_x) + row_offset;

  // kReduceUnroll vectors per lane at a time, all their loads (up to (R + 2) x kReduceUnroll per lane)
  // issued before the adds, which then run in the fixed order.
  for (int first = lane; first < num_vectors; first += kWarpSize * kReduceUnroll) {
    int4 v[kReduceUnroll][kMaxNvlRanks];
    int4 b0[kReduceUnroll], b1[kReduceUnroll];
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      const int64_t at = int64_t(first + u * kWarpSize) * 16;
      if (first + u * kWarpSize >= num_vectors) break;
#pragma unroll
      for (int r = 0; r < kMaxNvlRanks; ++r)
        if ((present >> r) & 1u) v[u][r] = device::load_cg_16(slots[r] + layout.payload_offset() + at);
      b0[u] = bias0 != nullptr ? device::load_nc_16(bias0 + at) : make_int4(0, 0, 0, 0);
      b1[u] = bias1 != nullptr ? device::load_nc_16(bias1 + at) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      if (first + u * kWarpSize >= num_vectors) break;
      float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int r = 0; r < kMaxNvlRanks; ++r)
        if ((present >> r) & 1u) accumulate_bf16x8(acc, v[u][r]);
      if (bias0 != nullptr) accumulate_bf16x8(acc, b0[u]);
      if (bias1 != nullptr) accumulate_bf16x8(acc, b1[u]);
      device::store_16(out + int64_t(first + u * kWarpSize) * 16, round_bf16x8(acc));
    }
  }
  if (p.combined_weights != nullptr && lane < layout.num_topk) {
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kMaxNvlRanks; ++r)
      if ((present >> r) & 1u)
        sum = __fadd_rn(sum, __ldcg(reinterpret_cast<const float*>(slots[r] + layout.weights_offset()) + lane));
    p.combined_weights[int64_t(token) * layout.num_topk + lane] = sum;
  }
}

__device__ void combine_receive(const CombineParams& p, int channel, uint64_t epoch) {
  __shared__ uint32_t sends[kMaxNvlRanks][kWindowWords];  // bit i: peer r sends window token i
  __shared__ uint32_t base[kMaxNvlRanks];                 // records of peer r before the window
  __shared__ int stop_flag;
  volatile int& stop = stop_flag;  // set by any warp, read by all after a barrier
  const NormalCommon& c = p.common;
  const int R = c.num_ranks, me = c.rank;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const uint32_t Q = static_cast<uint32_t>(c.queues.queue_tokens);
  const TokenRange range = channel_tokens(p.num_tokens, c.queues.num_channels, channel);
  // Lane r of every warp watches peer r's queue.
  const uint64_t* tail = lane < R ? at_offset<const uint64_t>(c.peers[me], tail_offset(lane, channel)) : nullptr;
  uint32_t published = 0;  // lane r: records of peer r known to be published
  if (tid < R) base[tid] = 0;
  if (tid == 0) stop = 0;
  __syncthreads();

  for (int window = range.begin; window < range.end && !stop; window += p.window_tokens) {
    const int n = min(p.window_tokens, range.end - window);
    const int num_words = (n + kWarpSize - 1) / kWarpSize;
    for (int word = warp; word < num_words; word += num_warps) {
      const int i = word * kWarpSize + lane;
      const int64_t t = window + i;
      for (int r = 0; r < R; ++r) {
        const uint32_t bits = __ballot_sync(~0u, i < n && p.in_rank[t * R + r] != 0);
        if (lane == 0) sends[r][word] = bits;
      }
    }
    __syncthreads();

    for (int i = warp; i < n; i += num_warps) {
      const int word = i / kWarpSize;
      const uint32_t bit = 1u << (i % kWarpSize);
      // Lane r: does peer r send this token, and at which index of its queue?
      bool sent = false;
      uint32_t index = 0;
      if (lane < R) {
        sent = (sends[lane][word] & bit) != 0;
        index = base[lane] + __popc(sends[lane][word] & (bit - 1));
        for (int w = 0; w < word; ++w) index += __popc(sends[lane][w]);
      }
      bool ok = true;
      if (sent && published <= index) {
        uint64_t seen = 0;
        ok = device::wait_or_report(
            tail, [&](uint64_t value) { return count_of(value, epoch) > index; }, seen, c.timeout_ns, c.errors,
            WaitSite{DevicePhase::kCombineRecv, lane});
        published = count_of(seen, epoch);
      }
      if (!__all_sync(~0u, ok)) {
        if (lane == 0) stop = 1;
        break;
      }
      __syncwarp();  // each lane's acquire is ordered before the other lanes' reads of the records
      const uint32_t present = __ballot_sync(~0u, sent);
      const char* slots[kMaxNvlRanks];
#pragma unroll
      for (int r = 0; r < kMaxNvlRanks; ++r) {
        const uint32_t at = __shfl_sync(~0u, index, r);
        slots[r] = (present >> r) & 1u
                       ? c.peers[me] + c.queues.queue_offset(r, channel) + int64_t(at % Q) * c.queues.record_bytes
                       : nullptr;
      }
      if (sent) {  // the record must be this token's: a cheap guard against protocol bugs
        const char* own =
            c.peers[me] + c.queues.queue_offset(lane, channel) + int64_t(index % Q) * c.queues.record_bytes;
        const int4 header = device::load_cg_16(own);
        if (header.x != window + i)
          device::report_error(c.errors, DeviceErrorKind::kProtocol, DevicePhase::kCombineRecv, lane, header.x,
                               window + i);
      }
      reduce_token(p, window + i, present, slots, lane);
    }
    __syncthreads();  // every record of the window is consumed
    if (tid < R) {
      uint32_t count = 0;
      for (int w = 0; w < num_words; ++w) count += __popc(sends[tid][w]);
      base[tid] += count;
      if (count != 0 && !stop)
        device::store_release_sys(at_offset<uint64_t>(c.peers[tid], head_offset(me, channel)),
                                  pack_head(epoch, base[tid]));
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kCombineThreads, 1) combine_kernel(const __grid_constant__ CombineParams p) {
  const NormalCommon& c = p.common;
  uint64_t epoch = 0;
  const bool proceed =
      enter_call(c, p.signature, handle_epoch(p.handle_meta, c.num_ranks), DevicePhase::kCombineSend, epoch);
  if (proceed) {
    if (blockIdx.x % 2 == 0)
      combine_send(p, blockIdx.x / 2, epoch);
    else
      combine_receive(p, blockIdx.x / 2, epoch);
  }
  finish_call(c, epoch);
}

}  // namespace
}  // namespace kernels

void launch_combine(const CombineParams& params, cudaStream_t stream) {
  launch_kernel(kernels::combine_kernel, 2 * params.common.queues.num_channels, kCombineThreads, 0, stream,
                /*overlap_previous=*/false, params);
}

}  // namespace epcomm::cuda
