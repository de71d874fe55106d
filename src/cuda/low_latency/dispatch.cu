// Low-latency dispatch (SPEC §4.1) over symmetric memory.
//
// Send kernel (one block per token, 512 threads, grid min(T, SMs)):
//   1. every block loads, all at once, the routing (duplicates and bad ids -> -1), its first token's
//      row and the peer table into shared memory / registers;
//   2. per token: warp k finds the token's row offset for its k-th expert (earlier tokens that chose
//      it) and, for a destination rank, the token's slot there (earlier tokens that go to that rank:
//      the slots of a source at a destination are dense); the token is cast once (FP8: 8 threads per
//      128-channel block) and stored once per destination rank, header included;
//   3. block b writes the message of destinations d = b, b + grid, ...: per local expert of d, how
//      many tokens chose it;
//   4. every block adds its share to each destination's flag (release, system scope): the flag is
//      complete when all blocks have added; block b's share for d = b, b + grid, ... also carries the
//      number of slots it filled at d. No block waits for another.
// Receive kernel (8 warps per block): waits for every unmasked source (learning its number of
// slots from the flag), loads its first (slot, part) while it turns the messages into the first
// row of each (local expert, source), then copies every received slot, in parts spread over warps
// (payload chunks, and the scales), into recv_x at row = first row + offset, for each local expert
// it names.
#include <algorithm>

#include "core/numerics.hpp"
#include "cuda/low_latency/device/primitives.cuh"

namespace epcomm::cuda::ll {
namespace {

constexpr int kSendThreads = 512;
constexpr int kRecvThreads = 256;
constexpr int kRecvWarps = kRecvThreads / 32;
constexpr int kHeaderBytes = static_cast<int>(LowLatencyLayout::kSlotHeaderBytes);
constexpr int kIdsAt = 4;                           // header int32 index of the expert ids
constexpr int kOffsetsAt = 4 + kMaxLowLatencyTopk;  // header int32 index of the row offsets
constexpr int kCopyUnroll = 8;                      // 16-byte vectors in flight per lane
constexpr int kPartVectors = 32 * kCopyUnroll;      // 16-byte vectors of one receive part
static_assert(kSendThreads / 32 >= kMaxLowLatencyTopk, "one warp per top-k slot");
static_assert(kHeaderBytes % 16 == 0, "the payload starts 16-byte aligned");

// Per-token state of a send block.
struct alignas(16) TokenState {  // header is read as 16-byte vectors
  int32_t header[kHeaderBytes / 4];
  uint8_t* dest_slots[kMaxLowLatencyTopk];  // the token's slot at each destination; null: via puts
  int32_t dest_ranks[kMaxLowLatencyTopk];
  int32_t dest_index[kMaxLowLatencyTopk];  // the token's slot index among this source's slots there
  int32_t num_dests;
  int32_t needs_staging;
};

__host__ __device__ __forceinline__ bool is_bf16(Format format) { return format == Format::kBf16; }

__device__ __forceinline__ int64_t payload_bytes(const DispatchParams& p) {
  return is_bf16(p.format) ? int64_t(p.hidden) * 2 : int64_t(p.hidden) + int64_t(p.hidden / 128) * 4;
}

// 16-byte vectors of a received payload (FP8: without the scales).
__host__ __device__ __forceinline__ int payload_vectors(Format format, int hidden) {
  return is_bf16(format) ? hidden / 8 : hidden / 16;
}

// Work items per received slot in the receive kernel: payload chunks of kPartVectors, plus one for
// the scales (FP8).
__host__ __device__ __forceinline__ int parts_per_slot(Format format, int hidden) {
  return (payload_vectors(format, hidden) + kPartVectors - 1) / kPartVectors + (is_bf16(format) ? 0 : 1);
}

// Send kernel shared memory, in this order (16-byte aligned pieces first).
struct SendShared {
  uint64_t* peer_base;  // [R]
  int32_t* usable;      // [R]
  int32_t* ids;         // [K][T]
  int32_t* counts;      // [E] tokens per expert (message blocks)
  int32_t* to_rank;     // [R] tokens per destination rank (message blocks)
};

__device__ __forceinline__ SendShared carve_send_shared(const DispatchParams& p, int32_t* smem) {
  SendShared s;
  s.peer_base = reinterpret_cast<uint64_t*>(smem);
  s.usable = reinterpret_cast<int32_t*>(s.peer_base + p.c.num_ranks);
  s.ids = s.usable + p.c.num_ranks;
  s.counts = s.ids + p.num_topk * p.num_tokens;
  s.to_rank = s.counts + p.num_experts;
  return s;
}

// ids[k * T + j] = token j's k-th expert, -1 for empty slots, repeats of an earlier slot and bad ids.
template <class Index>
__device__ void load_routing(const DispatchParams& p, int32_t* ids) {
  const int T = p.num_tokens, K = p.num_topk;
  const Index* topk = static_cast<const Index*>(p.topk_idx);
  for (int j = threadIdx.x; j < T; j += blockDim.x) {
    int64_t raw[kMaxLowLatencyTopk];
#pragma unroll
    for (int k = 0; k < kMaxLowLatencyTopk; ++k) raw[k] = k < K ? static_cast<int64_t>(topk[int64_t(j) * K + k]) : -1;
#pragma unroll
    for (int k = 0; k < kMaxLowLatencyTopk; ++k) {
      if (k >= K) break;
      int64_t e = raw[k];
      if (e < -1 || e >= p.num_experts) {
        if (blockIdx.x == 0)
          record_error(p.c, DeviceErrorKind::kBadIndex, DevicePhase::kLowLatencyDispatchSend, j, e,
                       p.num_experts * 32 + k);
        e = -1;
      }
#pragma unroll
      for (int k2 = 0; k2 < kMaxLowLatencyTopk; ++k2)
        if (k2 < k && raw[k2] == e) e = -1;
      ids[k * T + j] = static_cast<int32_t>(e);
    }
  }
}

// Header of token t and the list of ranks it goes to, with its slot index at each. Every warp
// derives the same destination list from the token's K ids (first slot naming a rank, rank usable);
// warp k < K then counts the earlier tokens that chose its expert and, when slot k is a
// destination's first, the earlier tokens that go to that rank.
__device__ void prepare_token(const DispatchParams& p, const SendShared& sh, int t, TokenState& s) {
  const int T = p.num_tokens, K = p.num_topk, L = p.num_local_experts;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lane_expert = lane < K ? sh.ids[lane * T + t] : -1;
  const int lane_rank = lane_expert >= 0 ? lane_expert / L : -1;
  const uint32_t same_rank = __match_any_sync(0xffffffffu, lane_rank);
  const bool first_of_rank = lane_rank >= 0 && (same_rank & ((1u << lane) - 1u)) == 0;
  const bool lane_is_dest = first_of_rank && sh.usable[lane_rank] != 0;
  const uint32_t dests = __ballot_sync(0xffffffffu, lane_is_dest);
  const uint32_t staged = __ballot_sync(0xffffffffu, lane_is_dest && sh.peer_base[lane_rank] == 0);
  if (warp < K) {
    // Rows of an expert are in token order, and so are a source's slots at a destination.
    const int k = warp;
    const int e = __shfl_sync(0xffffffffu, lane_expert, k);
    const int r = __shfl_sync(0xffffffffu, lane_rank, k);
    const bool is_dest = (dests >> k) & 1u;
    const int rank_first = r * L, rank_end = r * L + L;
    int earlier_expert = 0, earlier_rank = 0;
    if (e >= 0) {
      for (int base = 0; base < t; base += 32) {
        const int j = base + lane;
        bool same_expert = false, same_dest = false;
        if (j < t) {
          for (int k2 = 0; k2 < K; ++k2) {
            const int x = sh.ids[k2 * T + j];
            same_expert |= x == e;
            same_dest |= x >= rank_first && x < rank_end;
          }
        }
        earlier_expert += __popc(__ballot_sync(0xffffffffu, same_expert));
        earlier_rank += __popc(__ballot_sync(0xffffffffu, same_dest));
      }
    }
    if (lane == 0) {
      s.header[kIdsAt + k] = e;
      s.header[kOffsetsAt + k] = earlier_expert;
      if (is_dest) {
        const int i = __popc(dests & ((1u << k) - 1u));
        const uint64_t base = sh.peer_base[r];
        s.dest_ranks[i] = r;
        s.dest_index[i] = earlier_rank;
        s.dest_slots[i] = base != 0 ? reinterpret_cast<uint8_t*>(base) + p.recv_offset +
                                          (int64_t(p.c.rank) * p.max_tokens + earlier_rank) * p.slot_bytes
                                    : nullptr;
      }
    }
  }
  if (threadIdx.x == 0) {
    s.header[0] = t;
    s.header[1] = K;
    s.header[2] = 0;
    s.header[3] = 0;
    s.num_dests = __popc(dests);
    s.needs_staging = staged != 0;
  }
  __syncthreads();
}

// Stores 16 bytes at `offset` of the token's slot at every destination (and the staging slot).
__device__ __forceinline__ void store_everywhere(const TokenState& s, uint8_t* staging_slot, int64_t offset,
                                                 const uint4& v) {
  for (int i = 0; i < s.num_dests; ++i)
    if (s.dest_slots[i] != nullptr) st_data(s.dest_slots[i] + offset, v);
  if (staging_slot != nullptr) st_data(staging_slot + offset, v);
}

__device__ __forceinline__ void store_scale_everywhere(const TokenState& s, uint8_t* staging_slot, int64_t offset,
                                                       float scale) {
  for (int i = 0; i < s.num_dests; ++i)
    if (s.dest_slots[i] != nullptr) *reinterpret_cast<float*>(s.dest_slots[i] + offset) = scale;
  if (staging_slot != nullptr) *reinterpret_cast<float*>(staging_slot + offset) = scale;
}

__device__ __forceinline__ void unpack_bf16(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = numerics::bf16_to_float(static_cast<uint16_t>(w[i] & 0xFFFFu));
    out[2 * i + 1] = numerics::bf16_to_float(static_cast<uint16_t>(w[i] >> 16));
  }
}

// The first two 16-byte vectors a thread reads of a token, loaded early so that their latency
// overlaps the routing work (FP8: channels [16 i, 16 i + 16); bf16: vectors i and i + blockDim).
struct RowPrefetch {
  uint4 v[2];
};

__device__ __forceinline__ RowPrefetch prefetch_row(const DispatchParams& p, int t) {
  RowPrefetch r = {};
  if (t >= p.num_tokens) return r;
  const uint16_t* row = p.x + int64_t(t) * p.hidden;
  const int i = threadIdx.x;
  if (is_bf16(p.format)) {
    if (i < p.hidden / 8) r.v[0] = ld_input(row + 8 * i);
    if (i + int(blockDim.x) < p.hidden / 8) r.v[1] = ld_input(row + 8 * (i + blockDim.x));
  } else if (i < p.hidden / 16) {
    r.v[0] = ld_input(row + 16 * i);
    r.v[1] = ld_input(row + 16 * i + 8);
  }
  return r;
}

// FP8: thread i casts channels [16 i, 16 i + 16); the 8 threads of a 128-channel block share its amax.
__device__ void send_fp8_payload(const DispatchParams& p, const uint16_t* row, const TokenState& s,
                                 uint8_t* staging_slot, const RowPrefetch& prefetched) {
  const bool round_scale = p.format != Format::kFp8;
  const int num_groups = p.hidden / 16;
  const unsigned block_lanes = 0xFFu << (threadIdx.x & 24u);
  for (int i = threadIdx.x; i < num_groups; i += blockDim.x) {
    const bool first = i == int(threadIdx.x);
    float v[16];
    unpack_bf16(first ? prefetched.v[0] : ld_input(row + 16 * i), v);
    unpack_bf16(first ? prefetched.v[1] : ld_input(row + 16 * i + 8), v + 8);
    float amax = 0.0f;
#pragma unroll
    for (int c = 0; c < 16; ++c) amax = fmaxf(amax, fabsf(v[c]));
    amax = fmaxf(amax, __shfl_xor_sync(block_lanes, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(block_lanes, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(block_lanes, amax, 4));
    const float scale = numerics::fp8_scale(amax, round_scale);
    uint32_t packed[4] = {0, 0, 0, 0};
#pragma unroll
    for (int c = 0; c < 16; ++c) packed[c / 4] |= uint32_t(numerics::fp8_quantize(v[c], scale)) << (8 * (c % 4));
    store_everywhere(s, staging_slot, kHeaderBytes + 16 * int64_t(i),
                     make_uint4(packed[0], packed[1], packed[2], packed[3]));
    if ((i & 7) == 0) store_scale_everywhere(s, staging_slot, kHeaderBytes + p.hidden + 4 * int64_t(i / 8), scale);
  }
}

__device__ void send_bf16_payload(const DispatchParams& p, const uint16_t* row, const TokenState& s,
                                  uint8_t* staging_slot, const RowPrefetch& prefetched) {
  for (int i = threadIdx.x, n = 0; i < p.hidden / 8; i += blockDim.x, ++n)
    store_everywhere(s, staging_slot, kHeaderBytes + 16 * int64_t(i),
                     n == 0   ? prefetched.v[0]
                     : n == 1 ? prefetched.v[1]
                              : ld_input(row + 8 * i));
}

__device__ void send_token(const DispatchParams& p, const SendShared& sh, int t, TokenState& s,
                           const RowPrefetch& prefetched) {
  prepare_token(p, sh, t, s);
  uint8_t* staging_slot = s.needs_staging ? p.c.local + p.staging_offset + int64_t(t) * p.slot_bytes : nullptr;
  if (threadIdx.x < kHeaderBytes / 16)
    store_everywhere(s, staging_slot, 16 * threadIdx.x, reinterpret_cast<const uint4*>(s.header)[threadIdx.x]);
  const uint16_t* row = p.x + int64_t(t) * p.hidden;
  if (is_bf16(p.format)) {
    send_bf16_payload(p, row, s, staging_slot, prefetched);
  } else {
    send_fp8_payload(p, row, s, staging_slot, prefetched);
  }
  __syncthreads();  // the token state is rewritten by the next token
  if (s.needs_staging) {
    for (int i = 0; i < s.num_dests; ++i) {
      if (s.dest_slots[i] != nullptr) continue;
      const int64_t slot_offset = p.recv_offset + (int64_t(p.c.rank) * p.max_tokens + s.dest_index[i]) * p.slot_bytes;
      nvshmemx_putmem_nbi_block(p.c.local + slot_offset, staging_slot, kHeaderBytes + payload_bytes(p),
                                s.dest_ranks[i]);
    }
    __syncthreads();
  }
}

// Messages of the destinations d = blockIdx.x, blockIdx.x + gridDim.x, ... (see
// LowLatencyLayout::dispatch_message_bytes): | T | 0 | 0 | 0 | count per local expert of d |,
// counted from the routing in shared memory and written with one pass over all fields. The number
// of tokens that go to d (to_rank[d]) travels in the flag (dispatch_send_kernel).
__device__ void send_messages(const DispatchParams& p, const SendShared& sh) {
  const int T = p.num_tokens, K = p.num_topk, L = p.num_local_experts, R = p.c.num_ranks;
  const int G = gridDim.x, b = blockIdx.x;
  if (b >= R) return;
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x) sh.counts[i] = 0;
  for (int i = threadIdx.x; i < R; i += blockDim.x) sh.to_rank[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
    const int j = i / K, k = i % K;
    const int e = sh.ids[k * T + j];
    if (e < 0) continue;
    const int r = e / L;
    if (r % G != b) continue;
    atomicAdd(&sh.counts[e], 1);
    bool first_of_rank = true;  // the token goes to r once
    for (int k2 = 0; k2 < k; ++k2) {
      const int x = sh.ids[k2 * T + j];
      first_of_rank &= !(x >= r * L && x < r * L + L);
    }
    if (first_of_rank) atomicAdd(&sh.to_rank[r], 1);
  }
  __syncthreads();
  const int fields = 4 + L;
  const int mine = (R - 1 - b) / G + 1;  // destinations of this block
  for (int i = threadIdx.x; i < mine * fields; i += blockDim.x) {
    const int d = b + (i / fields) * G, f = i % fields;
    if (!sh.usable[d]) continue;
    const uint64_t base = sh.peer_base[d];
    uint8_t* message =
        base != 0 ? reinterpret_cast<uint8_t*>(base) + p.messages_offset + int64_t(p.c.rank) * p.message_bytes
                  : p.c.local + p.staging_offset + int64_t(p.max_tokens) * p.slot_bytes + int64_t(d) * p.message_bytes;
    const int32_t value = f == 0 ? T : f < 4 ? 0 : sh.counts[d * L + f - 4];
    reinterpret_cast<int32_t*>(message)[f] = value;
  }
  if (p.c.has_put_peers) {
    __syncthreads();
    for (int i = 0; i < mine; ++i) {
      const int d = b + i * G;
      if (!sh.usable[d] || sh.peer_base[d] != 0) continue;
      nvshmemx_putmem_nbi_block(
          p.c.local + p.messages_offset + int64_t(p.c.rank) * p.message_bytes,
          p.c.local + p.staging_offset + int64_t(p.max_tokens) * p.slot_bytes + int64_t(d) * p.message_bytes,
          p.message_bytes, d);
    }
  }
}

template <class Index>
__global__ void __launch_bounds__(kSendThreads) dispatch_send_kernel(const __grid_constant__ DispatchParams p) {
  extern __shared__ __align__(16) int32_t send_smem[];
  __shared__ TokenState token;
  allow_dependent_launch();
  const SendShared sh = carve_send_shared(p, send_smem);
  // Everything the block needs from global memory is requested at once.
  const bool gave_up = aborted(p.c);
  const RowPrefetch first_row = prefetch_row(p, blockIdx.x);
  load_peer_table(p.c, PeerTable{sh.peer_base, sh.usable});
  load_routing<Index>(p, sh.ids);
  __syncthreads();
  if (gave_up) return;
  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x)
    send_token(p, sh, t, token, t == int(blockIdx.x) ? first_row : prefetch_row(p, t));
  send_messages(p, sh);
  __syncthreads();
  if (p.c.has_put_peers) {
    if (threadIdx.x == 0) nvshmem_quiet();  // puts delivered before the flags go out
    __syncthreads();
  }
  // The block that wrote d's message also tells d, in the flag, how many slots it has there.
  const int G = gridDim.x, b = blockIdx.x;
  signal_destinations(p.c, kDispatchFlags0 + p.parity, PeerTable{sh.peer_base, sh.usable}, signal_value(b, G),
                      [&](int d) { return d % G == b ? sh.to_rank[d] : 0; });
}

// ---- receive ----------------------------------------------------------------------------------

// Receive kernel shared memory.
struct RecvShared {
  int32_t* first_rows;  // [L][R]: first row of (local expert, source)
  int32_t* slot_start;  // [R + 1]: first dense slot of each source (prefix of the slot counts)
  int32_t* usable;      // [R]
};

__device__ __forceinline__ RecvShared carve_recv_shared(const DispatchParams& p, int32_t* smem) {
  RecvShared s;
  s.first_rows = smem;
  s.slot_start = s.first_rows + p.num_local_experts * p.c.num_ranks;
  s.usable = s.slot_start + p.c.num_ranks + 1;
  return s;
}

// FP8 scales of a slot as the output stores them: lane's words for columns [base + 32 u + lane]
// (u < 4) of the float [L, S, N] or packed UE8M0 [L, S / 4, N] output, in words[u].x.
__device__ __forceinline__ void load_scales(const DispatchParams& p, const uint8_t* scales, int base, uint4* words) {
  const int lane = threadIdx.x % 32;
  const bool packed = p.format == Format::kFp8Ue8m0;
  const int columns = packed ? p.hidden / 512 : p.hidden / 128;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int c = base + u * 32 + lane;
    words[u].x = 0;
    if (c >= columns) continue;
    if (packed) {
      const uint4 four = ld_shared_data(scales + 16 * int64_t(c));
      const uint32_t w[4] = {four.x, four.y, four.z, four.w};
      uint32_t value = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) value |= uint32_t(numerics::ue8m0_byte(__uint_as_float(w[b]))) << (8 * b);
      words[u].x = value;
    } else {
      words[u].x = __ldcg(reinterpret_cast<const uint32_t*>(scales) + c);
    }
  }
}

// Writes the scales into the column-major output of every local expert of the slot (lane k holds
// (expert l, row) when bit k of `mine` is set); `words` holds the first 128 columns already.
__device__ void copy_scales(const DispatchParams& p, const uint8_t* scales, uint32_t mine, int l, int row,
                            uint4* words) {
  const int lane = threadIdx.x % 32;
  const int64_t num_rows = int64_t(p.c.num_ranks) * p.max_tokens;
  const int columns = p.format == Format::kFp8Ue8m0 ? p.hidden / 512 : p.hidden / 128;
  for (int base = 0; base < columns; base += 128) {
    if (base > 0) load_scales(p, scales, base, words);
    for (uint32_t todo = mine; todo != 0; todo &= todo - 1) {
      const int k = __ffs(todo) - 1;
      const int lk = __shfl_sync(0xffffffffu, l, k);
      const int rk = __shfl_sync(0xffffffffu, row, k);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int c = base + u * 32 + lane;
        if (c < columns)
          static_cast<uint32_t*>(p.recv_scales)[(int64_t(lk) * columns + c) * num_rows + rk] = words[u].x;
      }
    }
  }
}

// One part of a received slot in a warp's registers: the part's data (payload vectors, or for the
// scales part the scale words of its first 128 columns in data[u].x) and, in lanes k < 16, the
// slot's k-th expert id and row offset.
struct SlotPart {
  uint4 data[kCopyUnroll];
  const uint8_t* slot;
  int expert, offset;  // lane k < 16: header entries k; else -1, 0
  int token;           // the source's token index (part 0 only)
  int source, part;
};

// Loads part `item` of the dense slots (slot_start must be known, first_rows need not be).
__device__ __forceinline__ SlotPart load_slot_part(const DispatchParams& p, const RecvShared& sh, int64_t item,
                                                   int parts) {
  const int lane = threadIdx.x % 32;
  const int slot = static_cast<int>(item / parts);
  SlotPart m;
  m.part = static_cast<int>(item % parts);
  m.source = last_not_above(sh.slot_start, p.c.num_ranks, slot);
  const int i = slot - sh.slot_start[m.source];
  m.slot = p.c.local + p.recv_offset + (int64_t(m.source) * p.max_tokens + i) * p.slot_bytes;
  const int32_t* header = reinterpret_cast<const int32_t*>(m.slot);
  m.expert = -1;
  m.offset = 0;
  if (lane < kMaxLowLatencyTopk) {
    m.expert = __ldcg(header + kIdsAt + lane);
    m.offset = __ldcg(header + kOffsetsAt + lane);
  }
  m.token = m.part == 0 ? __ldcg(header) : 0;
  const uint8_t* payload = m.slot + kHeaderBytes;
  const int num_vectors = payload_vectors(p.format, p.hidden);
  if (m.part * kPartVectors < num_vectors) {
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int v = m.part * kPartVectors + u * 32 + lane;
      if (v < num_vectors) m.data[u] = ld_shared_data(payload + 16 * int64_t(v));
    }
  } else {
    load_scales(p, payload + p.hidden, 0, m.data);  // the first 128 columns (see copy_scales)
  }
  return m;
}

// Stores a loaded part into the rows of every local expert the slot names; part 0 also writes
// src_info and the row meta.
__device__ void store_slot_part(const DispatchParams& p, const RecvShared& sh, SlotPart& m, uint8_t* meta) {
  const int lane = threadIdx.x % 32;
  const int R = p.c.num_ranks, L = p.num_local_experts;
  const int64_t num_rows = int64_t(R) * p.max_tokens;
  const int num_vectors = payload_vectors(p.format, p.hidden);
  const int64_t row_bytes = is_bf16(p.format) ? int64_t(p.hidden) * 2 : p.hidden;
  const int l = m.expert - p.c.rank * L;
  int row = m.offset;
  bool mine = m.expert >= 0 && l >= 0 && l < L;
  if (mine) {
    row += sh.first_rows[l * R + m.source];
    mine = row >= 0 && row < num_rows;  // always true for messages of this library
  }
  const uint32_t mine_mask = __ballot_sync(0xffffffffu, mine);
  if (m.part * kPartVectors >= num_vectors) {
    copy_scales(p, m.slot + kHeaderBytes + p.hidden, mine_mask, l, row, m.data);
  } else {
    for (uint32_t todo = mine_mask; todo != 0; todo &= todo - 1) {
      const int k = __ffs(todo) - 1;
      const int64_t dst_row = int64_t(__shfl_sync(0xffffffffu, l, k)) * num_rows + __shfl_sync(0xffffffffu, row, k);
      uint8_t* dst = static_cast<uint8_t*>(p.recv_x) + dst_row * row_bytes;
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int v = m.part * kPartVectors + u * 32 + lane;
        if (v < num_vectors) st_data(dst + 16 * int64_t(v), m.data[u]);
      }
    }
  }
  if (m.part == 0 && mine) {
    p.src_info[int64_t(l) * num_rows + row] = m.token;
    meta[int64_t(l) * num_rows + row] = static_cast<uint8_t>(lane);  // the token's first slot with this expert
  }
}

__global__ void __launch_bounds__(kRecvThreads) dispatch_recv_kernel(const __grid_constant__ DispatchParams p) {
  extern __shared__ __align__(16) int32_t recv_smem[];
  const int R = p.c.num_ranks, L = p.num_local_experts;
  const RecvShared sh = carve_recv_shared(p, recv_smem);
  uint32_t ticket = 0;
  // The flags carry each source's number of slots here (payload): slot_start gets them.
  if (!wait_for_sources(p.c, kDispatchFlags0 + p.parity, DevicePhase::kLowLatencyDispatchRecv, p.wait_stats,
                        p.c.counters + kDispatchGate + p.parity, p.c.counters + kDispatchRecvDone + p.parity, sh.usable,
                        sh.slot_start, ticket))
    return;
  warp_exclusive_scan(R, sh.slot_start);
  __syncthreads();

  // Work items: (slot, part) over the dense slots of every source; a warp takes one at a time. The
  // first one is loaded now, together with the messages.
  const int parts = parts_per_slot(p.format, p.hidden);
  const int64_t num_items = int64_t(sh.slot_start[R]) * parts;
  const int64_t first_item = int64_t(blockIdx.x) * kRecvWarps + threadIdx.x / 32;
  const int64_t stride = int64_t(gridDim.x) * kRecvWarps;
  SlotPart first;
  if (first_item < num_items) first = load_slot_part(p, sh, first_item, parts);

  // Every message count in one pass of independent loads: first_rows holds the counts for now.
  const uint8_t* messages = p.c.local + p.messages_offset;
  for (int i = threadIdx.x; i < L * R; i += blockDim.x) {
    const int l = i / R, s = i % R;
    sh.first_rows[i] =
        sh.usable[s] ? __ldcg(reinterpret_cast<const int32_t*>(messages + s * p.message_bytes) + 4 + l) : 0;
  }
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int next = 0;
    for (int s = 0; s < R; ++s) {
      const int count = sh.first_rows[l * R + s];
      sh.first_rows[l * R + s] = next;
      if (blockIdx.x == 0) p.layout_range[int64_t(l) * R + s] = (int64_t(next) << 32) | int64_t(uint32_t(count));
      next += count;
    }
    if (blockIdx.x == 0) {
      p.recv_count[l] = next;
      if (p.cumulative_recv_stats != nullptr) p.cumulative_recv_stats[l] += next;
    }
  }
  __syncthreads();

  uint8_t* meta = p.c.local + p.meta_offset;
  if (first_item < num_items) store_slot_part(p, sh, first, meta);
  for (int64_t item = first_item + stride; item < num_items; item += stride) {
    SlotPart m = load_slot_part(p, sh, item, parts);
    store_slot_part(p, sh, m, meta);
  }

  release_flags(p.c, kDispatchFlags0 + p.parity, p.c.counters + kDispatchGate + p.parity,
                p.c.counters + kDispatchRecvDone + p.parity, ticket);
  wait_for_preceding_grid();
}

size_t send_smem_bytes(const DispatchParams& p) {
  const size_t R = p.c.num_ranks;
  return 8 * R + 4 * (R + size_t(p.num_topk) * p.num_tokens + p.num_experts + R);
}

size_t recv_smem_bytes(const DispatchParams& p) {
  const size_t R = p.c.num_ranks;
  return 4 * (size_t(p.num_local_experts) * R + (R + 1) + R);
}

}  // namespace

void launch_dispatch_send(const DispatchParams& p, int num_sms, cudaStream_t stream) {
  const int grid = std::max(1, std::min(p.num_tokens, num_sms));
  if (p.topk_is_int64) {
    launch_kernel(dispatch_send_kernel<int64_t>, grid, kSendThreads, send_smem_bytes(p), stream, false, p);
  } else {
    launch_kernel(dispatch_send_kernel<int32_t>, grid, kSendThreads, send_smem_bytes(p), stream, false, p);
  }
}

void launch_dispatch_recv(const DispatchParams& p, int num_sms, cudaStream_t stream, bool overlap_send) {
  const int64_t items = int64_t(p.c.num_ranks) * p.max_tokens * parts_per_slot(p.format, p.hidden);
  const int grid =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + kRecvWarps - 1) / kRecvWarps, num_sms)));
  launch_kernel(dispatch_recv_kernel, grid, kRecvThreads, recv_smem_bytes(p), stream, overlap_send, p);
}

void prepare_dispatch_kernels(int max_dynamic_smem) {
  allow_dynamic_smem(dispatch_send_kernel<int64_t>, max_dynamic_smem);
  allow_dynamic_smem(dispatch_send_kernel<int32_t>, max_dynamic_smem);
  allow_dynamic_smem(dispatch_recv_kernel, max_dynamic_smem);
}

}  // namespace epcomm::cuda::ll
