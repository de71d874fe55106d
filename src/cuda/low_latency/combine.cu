// Low-latency combine (SPEC §4.2) over symmetric memory.
//
// Send kernel (16 warps per block, grid = SMs): the rows of every local expert, flattened, cut in
// parts of 4 KiB spread over all warps of the grid (a 14 KiB row is moved by 4 warps at once); a
// warp loads its part's data together with the row's handle entries, then stores it. For row j of
// expert l the handle gives the source rank s (layout_range) and the token t (src_info), the
// dispatch's row meta the top-k slot k. The part goes to slot [t][k] of the combine receive region
// of rank s: straight from `x` with 16-byte stores when s is mapped over NVLink, else staged in
// local registered memory and put. Only the blocks that have parts to move take part; each adds its
// share to every destination's flag when its stores are done (no block waits for another).
// Receive kernel (256 threads, 8 channels each, blocks over (token, channel chunk)): waits for
// every unmasked source (the block's first token's routing is loaded meanwhile), then
// out[t] = bf16(acc), acc = fmaf(w[t][k], row(t, k), acc) over k ascending, row(t, k) read from the
// slot of the token's first k with the same expert; all K rows of a chunk are loaded at once.
#include <algorithm>

#include "core/numerics.hpp"
#include "cuda/low_latency/device/primitives.cuh"

namespace epcomm::cuda::ll {
namespace {

constexpr int kSendThreads = 512;
constexpr int kSendWarps = kSendThreads / 32;
constexpr int kRecvThreads = 256;
constexpr int kCopyUnroll = 8;                  // 16-byte vectors per lane of one part
constexpr int kPartVectors = 32 * kCopyUnroll;  // 16-byte vectors of one part (4 KiB)
constexpr int kRecvBlocksPerSm = 3;  // register budget of the receive kernel: 85 per thread (8 rows in flight)
constexpr int kLoadBatch = 8;        // rows in flight per thread in the receive kernel

__host__ __device__ __forceinline__ int parts_per_row(int hidden) {
  return (hidden / 8 + kPartVectors - 1) / kPartVectors;
}

// Send kernel shared memory.
struct SendShared {
  uint64_t* peer_base;    // [R]
  int32_t* usable;        // [R]
  int32_t* first;         // [L][R] first row of (expert, source)
  int32_t* count;         // [L][R] rows of (expert, source)
  int32_t* expert_start;  // [L + 1] flattened index of each expert's first row
};

__device__ __forceinline__ SendShared carve_send_shared(const CombineParams& p, int32_t* smem) {
  const int R = p.c.num_ranks, L = p.num_local_experts;
  SendShared s;
  s.peer_base = reinterpret_cast<uint64_t*>(smem);
  s.usable = reinterpret_cast<int32_t*>(s.peer_base + R);
  s.first = s.usable + R;
  s.count = s.first + L * R;
  s.expert_start = s.count + L * R;
  return s;
}

// One part of a row on its way: where it goes and its data.
struct PartMove {
  uint4 data[kCopyUnroll];
  const uint8_t* src;  // the part in `x`
  int64_t dst_offset;  // in the destination's symmetric memory; < 0: nothing to send
  int64_t row;         // flattened [L, N] row
  int vectors;         // 16-byte vectors in this part
  int rank;            // destination (the token's source rank)
};

// Finds part `item` of the flattened rows and loads its data together with the row's handle entries.
__device__ __forceinline__ PartMove load_part(const CombineParams& p, const SendShared& sh, int item, int parts) {
  const int lane = threadIdx.x % 32;
  const int R = p.c.num_ranks, L = p.num_local_experts;
  const int64_t num_rows = int64_t(R) * p.max_tokens;
  const int num_vectors = p.hidden / 8;
  const int g = item / parts, part = item % parts;
  const int l = last_not_above(sh.expert_start, L, g);
  const int j = g - sh.expert_start[l];
  const int s = last_not_above(sh.first + l * R, R, j);
  PartMove m;
  m.rank = s;
  m.row = int64_t(l) * num_rows + j;
  m.vectors = min(kPartVectors, num_vectors - part * kPartVectors);
  m.src = reinterpret_cast<const uint8_t*>(p.x + m.row * p.hidden) + int64_t(part) * kPartVectors * 16;
  m.dst_offset = -1;
  const bool valid = j < sh.first[l * R + s] + sh.count[l * R + s] && j < num_rows && sh.usable[s];
  if (!valid) return m;
  const int t = __ldg(p.src_info + m.row);
  const int k = p.meta[m.row];
#pragma unroll
  for (int u = 0; u < kCopyUnroll; ++u)
    if (u * 32 + lane < m.vectors) m.data[u] = ld_input(m.src + 16 * (u * 32 + lane));
  if (t < 0 || t >= p.max_tokens || k >= kMaxLowLatencyTopk) return m;  // not a handle of this buffer's dispatch
  m.dst_offset =
      p.recv_offset + (int64_t(t) * kMaxLowLatencyTopk + k) * p.hidden * 2 + int64_t(part) * kPartVectors * 16;
  return m;
}

__device__ __forceinline__ void store_part(const CombineParams& p, const SendShared& sh, const PartMove& m) {
  const int lane = threadIdx.x % 32;
  if (m.dst_offset < 0) return;
  const uint64_t base = sh.peer_base[m.rank];
  auto store_to = [&](uint8_t* dst) {
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (u * 32 + lane < m.vectors) st_data(dst + 16 * (u * 32 + lane), m.data[u]);
  };
  if (base != 0) {
    store_to(reinterpret_cast<uint8_t*>(base) + m.dst_offset);
    return;
  }
  // Put peer: the part leaves from local registered memory (`x` itself when it is the zero-copy
  // region, else a copy at the same place in the staging region).
  const uint8_t* staged = m.src;
  if (!p.x_is_staging) {
    uint8_t* copy = reinterpret_cast<uint8_t*>(p.staging) + (m.src - reinterpret_cast<const uint8_t*>(p.x));
    store_to(copy);
    staged = copy;
  }
  __syncwarp();
  nvshmemx_putmem_nbi_warp(p.c.local + m.dst_offset, staged, int64_t(m.vectors) * 16, m.rank);
}

__global__ void __launch_bounds__(kSendThreads) combine_send_kernel(const __grid_constant__ CombineParams p) {
  extern __shared__ __align__(16) int32_t send_smem[];
  const int R = p.c.num_ranks, L = p.num_local_experts;
  allow_dependent_launch();
  const SendShared sh = carve_send_shared(p, send_smem);
  // Everything the block needs from global memory is requested at once.
  const bool gave_up = aborted(p.c);
  load_peer_table(p.c, PeerTable{sh.peer_base, sh.usable});
  for (int i = threadIdx.x; i < L * R; i += blockDim.x) {
    const int64_t range = __ldg(p.layout_range + i);
    sh.first[i] = static_cast<int32_t>(range >> 32);
    sh.count[i] = static_cast<int32_t>(range & 0xFFFFFFFF);
  }
  __syncthreads();
  if (gave_up) return;
  // Rows of expert l end where its last source's range ends.
  for (int l = threadIdx.x; l < L; l += blockDim.x)
    sh.expert_start[l] = sh.first[l * R + R - 1] + sh.count[l * R + R - 1];
  __syncthreads();
  warp_exclusive_scan(L, sh.expert_start);
  __syncthreads();

  // Part `item` belongs to warp item % (gridDim.x * kSendWarps): blocks past the last part skip.
  const int parts = parts_per_row(p.hidden);
  const int items = sh.expert_start[L] * parts;
  const int active_blocks = max(1, min(int(gridDim.x), (items + kSendWarps - 1) / kSendWarps));
  if (int(blockIdx.x) >= active_blocks) return;
  const int warps = gridDim.x * kSendWarps;
  for (int item = blockIdx.x * kSendWarps + threadIdx.x / 32; item < items; item += warps)
    store_part(p, sh, load_part(p, sh, item, parts));
  __syncthreads();
  if (p.c.has_put_peers) {
    if (threadIdx.x == 0) nvshmem_quiet();  // puts delivered before the flags go out
    __syncthreads();
  }
  signal_destinations(p.c, kCombineFlags0 + p.parity, PeerTable{sh.peer_base, sh.usable},
                      signal_value(blockIdx.x, active_blocks), [](int) { return 0; });
}

__device__ __forceinline__ void accumulate(const uint4& v, float weight, float* acc) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = __fmaf_rn(weight, numerics::bf16_to_float(static_cast<uint16_t>(w[i] & 0xFFFFu)), acc[2 * i]);
    acc[2 * i + 1] = __fmaf_rn(weight, numerics::bf16_to_float(static_cast<uint16_t>(w[i] >> 16)), acc[2 * i + 1]);
  }
}

// The slot whose row slot k of token t adds (its first k with the same expert; -1: adds nothing),
// computed by lane k of warp 0 from the token's ids (lanes >= K hold -2).
__device__ __forceinline__ int source_slot(const CombineParams& p, const int32_t* usable, int t, int chunk, int64_t e) {
  const int k = threadIdx.x;
  const int L = p.num_local_experts;
  int slot = -1;
  for (int k2 = kMaxLowLatencyTopk - 1; k2 >= 0; --k2) {
    const int64_t other = __shfl_sync(0xffffffffu, e, k2);
    if (k2 <= k && other == e) slot = k2;
  }
  if (k >= p.num_topk) return -1;
  if (e < -1 || e >= p.num_experts) {
    if (chunk == 0)
      record_error(p.c, DeviceErrorKind::kBadIndex, DevicePhase::kLowLatencyCombineRecv, t, e, p.num_experts * 32 + k);
    return -1;
  }
  if (e < 0 || !usable[e / L]) return -1;
  return slot;
}

template <class Index>
__global__ void __launch_bounds__(kRecvThreads, kRecvBlocksPerSm)
    combine_recv_kernel(const __grid_constant__ CombineParams p) {
  extern __shared__ __align__(16) int32_t recv_smem[];
  __shared__ int32_t slot_of[kMaxLowLatencyTopk];  // receive slot that holds slot k's row; -1: k adds nothing
  __shared__ float weight_of[kMaxLowLatencyTopk];
  int32_t* usable = recv_smem;  // [R]
  const int K = p.num_topk;
  const int num_vectors = p.hidden / 8;
  const int chunks = (num_vectors + kRecvThreads - 1) / kRecvThreads;
  const int items = p.num_tokens * chunks;
  const int64_t row_bytes = int64_t(p.hidden) * 2;
  const Index* topk = static_cast<const Index*>(p.topk_idx);
  // The routing of the block's first token comes in while the block waits.
  int64_t expert = -2;
  float weight = 0.0f;
  auto load_routing = [&](int item) {
    const int t = item / chunks;
    expert = -2;
    if (threadIdx.x < K) {
      expert = static_cast<int64_t>(topk[int64_t(t) * K + threadIdx.x]);
      weight = p.topk_weights[int64_t(t) * K + threadIdx.x];
    }
  };
  if (int(blockIdx.x) < items) load_routing(blockIdx.x);
  uint32_t ticket = 0;
  if (!wait_for_sources(p.c, kCombineFlags0 + p.parity, DevicePhase::kLowLatencyCombineRecv, p.wait_stats,
                        p.c.counters + kCombineGate + p.parity, p.c.counters + kCombineRecvDone + p.parity, usable,
                        nullptr, ticket))
    return;
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int t = item / chunks, chunk = item % chunks;
    if (item != int(blockIdx.x)) load_routing(item);
    if (threadIdx.x < 32) {
      const int slot = source_slot(p, usable, t, chunk, expert);
      if (threadIdx.x < K) {
        slot_of[threadIdx.x] = slot;
        weight_of[threadIdx.x] = weight;
      }
    }
    __syncthreads();
    const int v = chunk * blockDim.x + threadIdx.x;
    if (v < num_vectors) {
      const uint8_t* rows = p.c.local + p.recv_offset + int64_t(t) * kMaxLowLatencyTopk * row_bytes + 16 * int64_t(v);
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      // Loads in batches (all rows of a batch in flight), accumulation strictly in ascending k.
      for (int k0 = 0; k0 < K; k0 += kLoadBatch) {
        uint4 data[kLoadBatch];
#pragma unroll
        for (int b = 0; b < kLoadBatch; ++b)
          if (k0 + b < K && slot_of[k0 + b] >= 0) data[b] = ld_shared_data(rows + slot_of[k0 + b] * row_bytes);
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
  release_flags(p.c, kCombineFlags0 + p.parity, p.c.counters + kCombineGate + p.parity,
                p.c.counters + kCombineRecvDone + p.parity, ticket);
  wait_for_preceding_grid();
}

size_t send_smem_bytes(const CombineParams& p) {
  const size_t R = p.c.num_ranks, L = p.num_local_experts;
  return 8 * R + 4 * (R + 2 * L * R + L + 1);
}

size_t recv_smem_bytes(const CombineParams& p) { return 4 * size_t(p.c.num_ranks); }

}  // namespace

void launch_combine_send(const CombineParams& p, int num_sms, cudaStream_t stream) {
  launch_kernel(combine_send_kernel, std::max(1, num_sms), kSendThreads, send_smem_bytes(p), stream, false, p);
}

void launch_combine_recv(const CombineParams& p, int num_sms, cudaStream_t stream, bool overlap_send) {
  const int chunks = (p.hidden / 8 + kRecvThreads - 1) / kRecvThreads;
  const int64_t items = int64_t(p.num_tokens) * chunks;
  const int grid =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, int64_t(num_sms) * kRecvBlocksPerSm)));
  if (p.topk_is_int64) {
    launch_kernel(combine_recv_kernel<int64_t>, grid, kRecvThreads, recv_smem_bytes(p), stream, overlap_send, p);
  } else {
    launch_kernel(combine_recv_kernel<int32_t>, grid, kRecvThreads, recv_smem_bytes(p), stream, overlap_send, p);
  }
}

void prepare_combine_kernels(int max_dynamic_smem) {
  allow_dynamic_smem(combine_send_kernel, max_dynamic_smem);
  allow_dynamic_smem(combine_recv_kernel<int64_t>, max_dynamic_smem);
  allow_dynamic_smem(combine_recv_kernel<int32_t>, max_dynamic_smem);
}

}  // namespace epcomm::cuda::ll
