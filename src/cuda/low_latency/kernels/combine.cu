// Low-latency combine (SPEC §4.2) over symmetric memory.
//
// Send kernel (16 warps per block, one row per warp): the rows of every local expert, flattened;
// for row j of expert l the handle gives the source rank s (layout_range) and the token t
// (src_info), the dispatch's row meta the top-k slot k. The bf16 row goes to slot [t][k] of the
// combine receive region of rank s: straight from `x` with 16-byte stores when s is mapped over
// NVLink, else copied to the staging region (unless x is the zero-copy region) and put with
// nvshmemx_putmem_nbi_warp. Each block with rows adds its arrival to every destination's flag
// (after nvshmem_quiet when some peer gets puts: device/primitives.cuh).
// Receive kernel (256 threads, 8 channels each, blocks over (token, channel chunk)): waits for
// every unmasked source, then out[t] = bf16(acc), acc = fmaf(w[t][k], row(t, k), acc) over k
// ascending, row(t, k) read from the slot of the token's first k with the same expert.
#include <algorithm>

#include "core/numerics.hpp"
#include "cuda/low_latency/kernels/common.cuh"

namespace epcomm::cuda::ll {
namespace {

constexpr int kSendThreads = 512;
constexpr int kRecvThreads = 256;
constexpr int kRecvBlocksPerSm = 4;  // register budget of the receive kernel: 64 per thread
constexpr int kLoadBatch = 4;        // rows in flight per thread in the receive kernel

// Last index i in [0, n) with keys[i] <= value (keys non-decreasing, keys[0] <= value).
__device__ __forceinline__ int last_not_above(const int32_t* keys, int n, int value, int stride) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (keys[mid * stride] <= value) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// A row travels in parts of one chunk (kernels/common.cuh).
__host__ __device__ __forceinline__ int parts_per_row(int hidden) {
  return (hidden / 8 + kPartVectors - 1) / kPartVectors;
}

// Sends part `part` of row j of local expert l to source rank s (slot [t][k] of its combine region).
__device__ void send_part(const CombineParams& p, const PeerTable& peers, int l, int j, int s, int part,
                          int64_t num_rows) {
  const int64_t row = int64_t(l) * num_rows + j;
  const int64_t row_bytes = int64_t(p.hidden) * 2;
  const int num_vectors = p.hidden / 8;
  const int first = part * kPartVectors;
  const uint8_t* src = reinterpret_cast<const uint8_t*>(p.x + row * p.hidden);
  // The part's data does not depend on where it goes: load it with the destination.
  Chunk chunk;
  load_chunk(src, first, num_vectors, chunk, [](const void* v) { return load_nc_16<uint4>(v); });
  const int t = __ldg(p.src_info + row);
  const int k = p.meta[row];
  if (t < 0 || t >= p.max_tokens || k >= kMaxLowLatencyTopk) return;  // not a handle of this buffer's dispatch
  const int64_t dst_offset = p.recv_offset + (int64_t(t) * kMaxLowLatencyTopk + k) * row_bytes;
  uint8_t* base = peers.base[s];
  if (base != nullptr) {
    store_chunk(base + dst_offset, first, num_vectors, chunk);
    return;
  }
  const int64_t part_offset = 16 * int64_t(first);
  const int64_t part_bytes = 16 * int64_t(min(kPartVectors, num_vectors - first));
  const uint8_t* staged = src;
  if (!p.x_is_staging) {
    uint8_t* staging_row = reinterpret_cast<uint8_t*>(p.staging + row * p.hidden);
    store_chunk(staging_row, first, num_vectors, chunk);
    staged = staging_row;
    __syncwarp();
  }
  nvshmemx_putmem_nbi_warp(p.c.local + dst_offset + part_offset, staged + part_offset, part_bytes, s);
}

__global__ void __launch_bounds__(kSendThreads) combine_send_kernel(const __grid_constant__ CombineParams p) {
  extern __shared__ __align__(16) uint8_t send_smem[];
  const int R = p.c.num_ranks, L = p.num_local_experts;
  const int64_t num_rows = int64_t(R) * p.max_tokens;
  const PeerTable peers = peer_table_at(p.c, send_smem);
  int32_t* first = reinterpret_cast<int32_t*>(send_smem + peer_table_bytes(R));  // [L][R] first row of (expert, source)
  int32_t* count = first + L * R;                                                // [L][R] rows of (expert, source)
  int32_t* expert_start = count + L * R;  // [L + 1] flattened index of each expert's first row
  PhaseTrace trace;
  allow_dependent_launch();
  const bool dead = aborted(p.c);  // used after the first loads, so that it is in flight with them
  load_peer_table(p.c, peers);
  for (int i = threadIdx.x; i < L * R; i += blockDim.x) {
    const int64_t range = __ldg(p.layout_range + i);
    first[i] = static_cast<int32_t>(range >> 32);
    count[i] = static_cast<int32_t>(range & 0xFFFFFFFF);
  }
  __syncthreads();
  if (dead) return;
  trace.mark();
  if (threadIdx.x < 32) {  // exclusive scan of the experts' row counts
    const int lane = threadIdx.x;
    int carry = 0;
    for (int base = 0; base < L; base += 32) {
      const int l = base + lane;
      const int rows = l < L ? first[l * R + R - 1] + count[l * R + R - 1] : 0;
      int inclusive = rows;
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += other;
      }
      if (l < L) expert_start[l] = carry + inclusive - rows;
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) expert_start[L] = carry;
  }
  __syncthreads();

  // Work units are (row, part); only the blocks that get units take part (block 0 always): the
  // others have nothing to signal.
  const int parts = parts_per_row(p.hidden);
  const int64_t units = int64_t(expert_start[L]) * parts;
  const int warps = blockDim.x / 32;
  const int active = int(max(int64_t(1), min(int64_t(gridDim.x), (units + warps - 1) / warps)));
  if (int(blockIdx.x) >= active) return;
  trace.mark();
  for (int64_t unit = int64_t(blockIdx.x) * warps + threadIdx.x / 32; unit < units; unit += int64_t(active) * warps) {
    const int f = static_cast<int>(unit / parts), part = static_cast<int>(unit % parts);
    const int l = last_not_above(expert_start, L, f, 1);
    const int j = f - expert_start[l];
    const int s = last_not_above(first + l * R, R, j, 1);
    if (j >= first[l * R + s] + count[l * R + s] || j >= num_rows) continue;
    if (!peers.usable[s]) continue;
    send_part(p, peers, l, j, s, part, num_rows);
  }
  trace.mark();
  signal_destinations(p.c, kCombineFlags0 + p.parity, peers, signal_value(blockIdx.x, active));
  trace.print("combine_send", p.c.rank, p.num_tokens, trace_counter(2));
}

__device__ __forceinline__ void accumulate(const uint4& v, float weight, float* acc) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = __fmaf_rn(weight, numerics::bf16_to_float(static_cast<uint16_t>(w[i] & 0xFFFFu)), acc[2 * i]);
    acc[2 * i + 1] = __fmaf_rn(weight, numerics::bf16_to_float(static_cast<uint16_t>(w[i] >> 16)), acc[2 * i + 1]);
  }
}

// Slot k of a token's routing, read by thread k.
struct TopkEntry {
  int64_t expert = -1;
  float weight = 0.0f;
};

template <class Index>
__device__ __forceinline__ TopkEntry load_topk_entry(const CombineParams& p, int t) {
  TopkEntry entry;
  if (t >= 0 && int(threadIdx.x) < p.num_topk) {
    const int64_t at = int64_t(t) * p.num_topk + threadIdx.x;
    entry.expert = static_cast<int64_t>(static_cast<const Index*>(p.topk_idx)[at]);
    entry.weight = p.topk_weights[at];
  }
  return entry;
}

template <class Index>
__global__ void __launch_bounds__(kRecvThreads, kRecvBlocksPerSm)
    combine_recv_kernel(const __grid_constant__ CombineParams p) {
  extern __shared__ __align__(16) uint8_t recv_smem[];
  __shared__ int64_t expert_of[kMaxLowLatencyTopk];
  __shared__ int32_t slot_of[kMaxLowLatencyTopk];  // receive slot that holds slot k's row; -1: k adds nothing
  __shared__ float weight_of[kMaxLowLatencyTopk];
  const int K = p.num_topk, L = p.num_local_experts;
  const int num_vectors = p.hidden / 8;
  const int chunks = (num_vectors + blockDim.x - 1) / blockDim.x;
  const int num_items = p.num_tokens * chunks;
  const int64_t row_bytes = int64_t(p.hidden) * 2;
  const PeerTable peers = peer_table_at(p.c, recv_smem);
  PhaseTrace trace;
  load_peer_table(p.c, peers);
  // The routing is an input: the block's first token's is loaded while the rows are in flight.
  TopkEntry next = load_topk_entry<Index>(p, int(blockIdx.x) < num_items ? int(blockIdx.x) / chunks : -1);
  const ReceiveCounters counters{p.c.counters + kCombineGate + p.parity, p.c.counters + kCombineReaders + p.parity};
  uint32_t ticket = 0;
  if (!wait_for_sources(p.c, kCombineFlags0 + p.parity, DevicePhase::kLowLatencyCombineRecv, p.wait_stats, counters,
                        peers, ticket))
    return;
  trace.mark();
  for (int item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int t = item / chunks, chunk = item % chunks;
    if (int(threadIdx.x) < K) {
      expert_of[threadIdx.x] = next.expert;
      weight_of[threadIdx.x] = next.weight;
    }
    __syncthreads();
    const int following = item + int(gridDim.x);
    next = load_topk_entry<Index>(p, following < num_items ? following / chunks : -1);
    if (int(threadIdx.x) < K) {
      const int k = threadIdx.x;
      const int64_t e = expert_of[k];
      int slot = -1;
      if (e < -1 || e >= p.num_experts) {
        if (chunk == 0)
          record_error(p.c, DeviceErrorKind::kBadIndex, DevicePhase::kLowLatencyCombineRecv, t, e,
                       p.num_experts * 32 + k);
      } else if (e >= 0 && peers.usable[e / L]) {
        slot = k;
        for (int k2 = k - 1; k2 >= 0; --k2)
          if (expert_of[k2] == e) slot = k2;
      }
      slot_of[k] = slot;
    }
    __syncthreads();
    const int v = chunk * blockDim.x + threadIdx.x;
    if (v < num_vectors) {
      const uint8_t* rows = p.c.local + p.recv_offset + int64_t(t) * kMaxLowLatencyTopk * row_bytes + 16 * int64_t(v);
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      // Loads in batches (several rows in flight), accumulation strictly in ascending k.
      for (int k0 = 0; k0 < K; k0 += kLoadBatch) {
        uint4 data[kLoadBatch];
#pragma unroll
        for (int b = 0; b < kLoadBatch; ++b)
          if (k0 + b < K && slot_of[k0 + b] >= 0) data[b] = load_cg_16<uint4>(rows + slot_of[k0 + b] * row_bytes);
#pragma unroll
        for (int b = 0; b < kLoadBatch; ++b)
          if (k0 + b < K && slot_of[k0 + b] >= 0) accumulate(data[b], weight_of[k0 + b], acc);
      }
      uint32_t packed[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        packed[i] =
            uint32_t(numerics::float_to_bf16(acc[2 * i])) | (uint32_t(numerics::float_to_bf16(acc[2 * i + 1])) << 16);
      *reinterpret_cast<uint4*>(p.out + int64_t(t) * p.hidden + 8 * v) =
          make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
    __syncthreads();
  }
  trace.mark();
  release_flags(p.c, kCombineFlags0 + p.parity, counters, ticket);
  wait_for_preceding_grid();
  trace.print("combine_recv", p.c.rank, p.num_tokens, trace_counter(3));
}

size_t send_smem_bytes(const CombineParams& p) {
  return peer_table_bytes(p.c.num_ranks) +
         sizeof(int32_t) * (2 * size_t(p.num_local_experts) * p.c.num_ranks + p.num_local_experts + 1);
}

}  // namespace

void launch_combine_send(const CombineParams& p, int num_sms, cudaStream_t stream) {
  launch_kernel(combine_send_kernel, std::max(1, num_sms), kSendThreads, send_smem_bytes(p), stream, false, p);
}

void launch_combine_recv(const CombineParams& p, int num_sms, cudaStream_t stream, bool overlap_send) {
  const int chunks = (p.hidden / 8 + kRecvThreads - 1) / kRecvThreads;
  const int64_t items = int64_t(p.num_tokens) * chunks;
  const int grid =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, int64_t(num_sms) * kRecvBlocksPerSm)));
  const size_t smem = peer_table_bytes(p.c.num_ranks);
  if (p.topk_is_int64) {
    launch_kernel(combine_recv_kernel<int64_t>, grid, kRecvThreads, smem, stream, overlap_send, p);
  } else {
    launch_kernel(combine_recv_kernel<int32_t>, grid, kRecvThreads, smem, stream, overlap_send, p);
  }
}

void prepare_combine_kernels(int max_dynamic_smem) { allow_dynamic_smem(combine_send_kernel, max_dynamic_smem); }

}  // namespace epcomm::cuda::ll
