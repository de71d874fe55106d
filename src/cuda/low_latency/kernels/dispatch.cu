// Low-latency dispatch (SPEC §4.1) over symmetric memory.
//
// Send kernel (one block per token, 512 threads):
//   1. every block copies the whole routing and the peer table into shared memory (duplicates and
//      bad ids -> -1) and counts the tokens of every expert;
//   2. block b writes, in one pass, the messages for destinations d = b, b + grid, ...: the
//      source's T, one count per local expert of d, one bit per token that goes to d;
//   3. per token: warp k counts the earlier tokens that chose expert k (the token's row offset in
//      that expert's rows from this source), the token is cast once (FP8: 8 threads per 128-channel
//      block) and stored once per destination rank into slot [source][token] of that rank (for
//      peers on puts: once into a staging slot, then nvshmemx_putmem_nbi_block to each; messages
//      likewise);
//   4. each block adds its arrival to every destination's flag (release, system scope; after
//      nvshmem_quiet when some peer gets puts).
// Receive kernel (8 warps per block, one slot per warp): waits for every unmasked source, turns
// the messages into the first row of each (local expert, source), then copies every received
// slot into recv_x at row = first row + offset, for each of its local experts.
#include <algorithm>

#include "core/numerics.hpp"
#include "cuda/low_latency/kernels/common.cuh"

namespace epcomm::cuda::ll {
namespace {

constexpr int kSendThreads = 512;
constexpr int kRecvThreads = 256;
constexpr int kHeaderBytes = static_cast<int>(LowLatencyLayout::kSlotHeaderBytes);
constexpr int kIdsAt = 4;                           // header int32 index of the expert ids
constexpr int kOffsetsAt = 4 + kMaxLowLatencyTopk;  // header int32 index of the row offsets
static_assert(kSendThreads / 32 >= kMaxLowLatencyTopk, "one warp per top-k slot");
static_assert(kHeaderBytes % 16 == 0, "the payload starts 16-byte aligned");

// Per-token state of a send block.
struct alignas(16) TokenState {  // header is read as 16-byte vectors
  int32_t header[kHeaderBytes / 4];
  uint8_t* dest_slots[kMaxLowLatencyTopk];  // the token's slot at each destination; null: via puts
  int32_t dest_ranks[kMaxLowLatencyTopk];
  int32_t num_dests;
  int32_t needs_staging;
};

__device__ __forceinline__ int64_t payload_bytes(const DispatchParams& p) {
  return p.format == Format::kBf16 ? int64_t(p.hidden) * 2 : int64_t(p.hidden) + int64_t(p.hidden / 128) * 4;
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

// counts[e] = the tokens of this source that chose expert e (every thread calls, after the
// routing is in shared memory and counts is zero).
__device__ void count_experts(const DispatchParams& p, const int32_t* ids, int32_t* counts) {
  for (int i = threadIdx.x; i < p.num_tokens * p.num_topk; i += blockDim.x)
    if (ids[i] >= 0) atomicAdd(&counts[ids[i]], 1);
}

// Where the message to d is written: d's message region when d is mapped, else the staging copy
// that a put sends (see LowLatencyLayout::dispatch_message_bytes for its fields).
__device__ __forceinline__ int32_t* message_for(const DispatchParams& p, const PeerTable& peers, int d) {
  uint8_t* base = peers.base[d];
  uint8_t* message = base != nullptr ? base + p.messages_offset + int64_t(p.c.rank) * p.message_bytes
                                     : p.c.local + p.staging_offset + int64_t(p.max_tokens) * p.slot_bytes +
                                           int64_t(d) * p.message_bytes;
  return reinterpret_cast<int32_t*>(message);
}

// The messages of this block's destinations d = blockIdx.x, + gridDim.x, ... in one pass: a thread
// per header or count field, a warp per word of token bits. Every thread calls.
__device__ void send_messages(const DispatchParams& p, const int32_t* ids, const int32_t* counts,
                              const PeerTable& peers) {
  const int T = p.num_tokens, K = p.num_topk, L = p.num_local_experts;
  const int num_words = (p.max_tokens + 31) / 32;
  const int fields = 4 + L;  // header (T, 0, 0, 0), then the counts; the words follow
  const int mine = (p.c.num_ranks - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
  auto destination = [&](int i) { return int(blockIdx.x) + i * int(gridDim.x); };
  for (int i = threadIdx.x; i < mine * fields; i += blockDim.x) {
    const int d = destination(i / fields), f = i % fields;
    if (peers.usable[d]) message_for(p, peers, d)[f] = f == 0 ? T : f < 4 ? 0 : counts[d * L + f - 4];
  }
  const int lane = threadIdx.x % 32;
  for (int i = threadIdx.x / 32; i < mine * num_words; i += blockDim.x / 32) {
    const int d = destination(i / num_words), w = i % num_words;
    if (!peers.usable[d]) continue;  // warp-uniform
    const int j = 32 * w + lane;
    bool hit = false;
    for (int k = 0; k < K && j < T; ++k) hit |= ids[k * T + j] >= d * L && ids[k * T + j] < d * L + L;
    const uint32_t word = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) reinterpret_cast<uint32_t*>(message_for(p, peers, d) + fields)[w] = word;
  }
  if (!p.c.has_put_peers) return;
  __syncthreads();
  for (int i = 0; i < mine; ++i) {
    const int d = destination(i);
    if (peers.usable[d] && peers.base[d] == nullptr)
      nvshmemx_putmem_nbi_block(p.c.local + p.messages_offset + int64_t(p.c.rank) * p.message_bytes,
                                message_for(p, peers, d), p.message_bytes, d);
  }
}

// Header of token t and the list of ranks it goes to.
__device__ void prepare_token(const DispatchParams& p, const PeerTable& peers, const int32_t* ids, int t,
                              TokenState& s) {
  const int T = p.num_tokens, K = p.num_topk, L = p.num_local_experts;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp < kMaxLowLatencyTopk) {
    // Rows of an expert are in token order, so the token's row offset among this source's rows of
    // expert e is the number of earlier tokens that chose e.
    const int k = warp;
    const int e = k < K ? ids[k * T + t] : -1;
    int earlier = 0;
    if (e >= 0) {
      for (int base = 0; base < t; base += 32) {
        const int j = base + lane;
        bool same = false;
        if (j < t)
          for (int k2 = 0; k2 < K; ++k2) same |= ids[k2 * T + j] == e;
        earlier += __popc(__ballot_sync(0xffffffffu, same));
      }
    }
    if (lane == 0) {
      s.header[kIdsAt + k] = e;
      s.header[kOffsetsAt + k] = earlier;
    }
  }
  if (threadIdx.x == 0) {
    s.header[0] = t;
    s.header[1] = K;
    s.header[2] = 0;
    s.header[3] = 0;
    int n = 0, staging = 0;
    for (int k = 0; k < K; ++k) {
      const int e = ids[k * T + t];
      if (e < 0) continue;
      const int r = e / L;
      bool seen = false;
      for (int i = 0; i < n; ++i) seen |= s.dest_ranks[i] == r;
      if (seen || !peers.usable[r]) continue;
      uint8_t* base = peers.base[r];
      s.dest_ranks[n] = r;
      s.dest_slots[n] =
          base != nullptr ? base + p.recv_offset + (int64_t(p.c.rank) * p.max_tokens + t) * p.slot_bytes : nullptr;
      staging |= base == nullptr;
      ++n;
    }
    s.num_dests = n;
    s.needs_staging = staging;
  }
  __syncthreads();
}

// Stores 16 bytes at `offset` of the token's slot at every destination (and the staging slot).
__device__ __forceinline__ void store_everywhere(const TokenState& s, uint8_t* staging_slot, int64_t offset,
                                                 const uint4& v) {
  for (int i = 0; i < s.num_dests; ++i)
    if (s.dest_slots[i] != nullptr) store_cg_16(s.dest_slots[i] + offset, v);
  if (staging_slot != nullptr) store_cg_16(staging_slot + offset, v);
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
  if (p.format == Format::kBf16) {
    if (i < p.hidden / 8) r.v[0] = load_nc_16<uint4>(row + 8 * i);
    if (i + int(blockDim.x) < p.hidden / 8) r.v[1] = load_nc_16<uint4>(row + 8 * (i + blockDim.x));
  } else if (i < p.hidden / 16) {
    r.v[0] = load_nc_16<uint4>(row + 16 * i);
    r.v[1] = load_nc_16<uint4>(row + 16 * i + 8);
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
    unpack_bf16(first ? prefetched.v[0] : load_nc_16<uint4>(row + 16 * i), v);
    unpack_bf16(first ? prefetched.v[1] : load_nc_16<uint4>(row + 16 * i + 8), v + 8);
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
                              : load_nc_16<uint4>(row + 8 * i));
}

__device__ void send_token(const DispatchParams& p, const PeerTable& peers, const int32_t* ids, int t, TokenState& s,
                           const RowPrefetch& prefetched, PhaseTrace& trace) {
  prepare_token(p, peers, ids, t, s);
  trace.mark();
  uint8_t* staging_slot = s.needs_staging ? p.c.local + p.staging_offset + int64_t(t) * p.slot_bytes : nullptr;
  if (threadIdx.x < kHeaderBytes / 16)
    store_everywhere(s, staging_slot, 16 * threadIdx.x, reinterpret_cast<const uint4*>(s.header)[threadIdx.x]);
  const uint16_t* row = p.x + int64_t(t) * p.hidden;
  if (p.format == Format::kBf16) {
    send_bf16_payload(p, row, s, staging_slot, prefetched);
  } else {
    send_fp8_payload(p, row, s, staging_slot, prefetched);
  }
  trace.mark();
  __syncthreads();
  trace.mark();
  if (s.needs_staging) {
    const int64_t slot_offset = p.recv_offset + (int64_t(p.c.rank) * p.max_tokens + t) * p.slot_bytes;
    for (int i = 0; i < s.num_dests; ++i)
      if (s.dest_slots[i] == nullptr)
        nvshmemx_putmem_nbi_block(p.c.local + slot_offset, staging_slot, kHeaderBytes + payload_bytes(p),
                                  s.dest_ranks[i]);
    __syncthreads();
  }
}

// Shared memory of the send kernel: the peer table first (8-byte aligned), then int32 arrays.
struct SendShared {
  PeerTable peers;
  int32_t* ids;     // [K][T]
  int32_t* counts;  // [E]
};

__device__ __forceinline__ SendShared send_shared_at(const DispatchParams& p, uint8_t* smem) {
  SendShared s;
  s.peers = peer_table_at(p.c, smem);
  s.ids = reinterpret_cast<int32_t*>(smem + peer_table_bytes(p.c.num_ranks));
  s.counts = s.ids + p.num_topk * p.num_tokens;
  return s;
}

template <class Index>
__global__ void __launch_bounds__(kSendThreads) dispatch_send_kernel(const __grid_constant__ DispatchParams p) {
  extern __shared__ __align__(16) uint8_t send_smem[];
  __shared__ TokenState token;
  PhaseTrace trace;
  allow_dependent_launch();
  const bool dead = aborted(p.c);  // used after the first loads, so that it is in flight with them
  const SendShared sh = send_shared_at(p, send_smem);
  const RowPrefetch first_row = prefetch_row(p, blockIdx.x);
  load_peer_table(p.c, sh.peers);
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) sh.counts[e] = 0;
  load_routing<Index>(p, sh.ids);
  __syncthreads();
  if (dead) return;
  trace.mark();
  count_experts(p, sh.ids, sh.counts);
  __syncthreads();
  trace.mark();
  send_messages(p, sh.ids, sh.counts, sh.peers);
  trace.mark();
  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x)
    send_token(p, sh.peers, sh.ids, t, token, t == int(blockIdx.x) ? first_row : prefetch_row(p, t), trace);
  trace.mark();
  signal_destinations(p.c, kDispatchFlags0 + p.parity, sh.peers, signal_value(blockIdx.x, gridDim.x));
  trace.print("dispatch_send", p.c.rank, p.num_tokens, trace_counter(0));
}

// ---- receive ----------------------------------------------------------------------------------

// A work unit of the receive kernel is one part of one received slot (kernels/common.cuh): a
// chunk of its payload and, for part 0, its scales and its src_info / meta entries.
constexpr int kScaleGroups = 2;  // 32-column groups of scales loaded with part 0 (hidden <= 8192 at once)

__host__ __device__ __forceinline__ int payload_vectors(Format format, int hidden) {
  return format == Format::kBf16 ? hidden / 8 : hidden / 16;
}
__host__ __device__ __forceinline__ int parts_per_slot(Format format, int hidden) {
  return (payload_vectors(format, hidden) + kPartVectors - 1) / kPartVectors;
}

// What a warp has loaded of one unit; lane k < K holds the slot's k-th expert and row offset.
struct LoadedPart {
  int expert = -1;
  int offset = 0;
  Chunk chunk;
  uint32_t scale_words[kScaleGroups];
};

struct UnitPlace {
  int source, token, part;
};

__device__ __forceinline__ UnitPlace unit_place(const DispatchParams& p, int64_t unit, int parts) {
  const int64_t slot = unit / parts;
  return UnitPlace{static_cast<int>(slot / p.max_tokens), static_cast<int>(slot % p.max_tokens),
                   static_cast<int>(unit % parts)};
}

__device__ __forceinline__ const uint8_t* slot_address(const DispatchParams& p, const UnitPlace& u) {
  return p.c.local + p.recv_offset + (int64_t(u.source) * p.max_tokens + u.token) * p.slot_bytes;
}

// Scale column c of a slot as the output stores it: a float's bits, or (UE8M0) four exponent bytes.
__device__ __forceinline__ uint32_t load_scale_word(const DispatchParams& p, const uint8_t* scales, int c) {
  if (p.format != Format::kFp8Ue8m0) return __ldcg(reinterpret_cast<const uint32_t*>(scales) + c);
  const uint4 four = load_cg_16<uint4>(scales + 16 * int64_t(c));
  const uint32_t w[4] = {four.x, four.y, four.z, four.w};
  uint32_t value = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) value |= uint32_t(numerics::ue8m0_byte(__uint_as_float(w[i]))) << (8 * i);
  return value;
}

__device__ __forceinline__ int scale_columns(const DispatchParams& p) {
  return p.format == Format::kFp8Ue8m0 ? p.hidden / 512 : p.hidden / 128;
}

// Issues every load of a unit at once: header, payload part and (part 0 of FP8) the scales.
__device__ __forceinline__ void load_part(const DispatchParams& p, const UnitPlace& u, LoadedPart& loaded) {
  const int lane = threadIdx.x % 32;
  const uint8_t* slot = slot_address(p, u);
  if (lane < kMaxLowLatencyTopk) {
    loaded.expert = __ldcg(reinterpret_cast<const int32_t*>(slot) + kIdsAt + lane);
    loaded.offset = __ldcg(reinterpret_cast<const int32_t*>(slot) + kOffsetsAt + lane);
  }
  const uint8_t* payload = slot + kHeaderBytes;
  load_chunk(payload, u.part * kPartVectors, payload_vectors(p.format, p.hidden), loaded.chunk,
             [](const void* v) { return load_cg_16<uint4>(v); });
  if (p.format == Format::kBf16 || u.part != 0) return;
  const int columns = scale_columns(p);
#pragma unroll
  for (int g = 0; g < kScaleGroups; ++g) {
    const int c = 32 * g + lane;
    loaded.scale_words[g] = c < columns ? load_scale_word(p, payload + p.hidden, c) : 0;
  }
}

// Writes scale word `value` of column c into the column-major [L, columns, N] output, for every
// local expert of the slot (lane k holds (expert l, row) when bit k of `mine` is set).
__device__ __forceinline__ void store_scale_word(const DispatchParams& p, uint32_t value, int c, uint32_t mine, int l,
                                                 int row, int64_t num_rows) {
  const int columns = scale_columns(p);
  for (uint32_t todo = mine; todo != 0; todo &= todo - 1) {
    const int k = __ffs(todo) - 1;
    const int lk = __shfl_sync(0xffffffffu, l, k);
    const int rk = __shfl_sync(0xffffffffu, row, k);
    if (c < columns) static_cast<uint32_t*>(p.recv_scales)[(int64_t(lk) * columns + c) * num_rows + rk] = value;
  }
}

// Stores a loaded unit into the row of every local expert the slot's token chose.
__device__ void store_part(const DispatchParams& p, const UnitPlace& u, const LoadedPart& loaded,
                           const int32_t* first_rows, uint8_t* meta) {
  const int lane = threadIdx.x % 32;
  const int R = p.c.num_ranks, L = p.num_local_experts;
  const int64_t num_rows = int64_t(R) * p.max_tokens;
  const int l = loaded.expert - p.c.rank * L;
  int row = loaded.offset;
  bool mine = loaded.expert >= 0 && l >= 0 && l < L;
  if (mine) {
    row += first_rows[l * R + u.source];
    mine = row >= 0 && row < num_rows;  // always true for messages of this library
  }
  const uint32_t mine_mask = __ballot_sync(0xffffffffu, mine);
  if (mine_mask == 0) return;
  const bool bf16 = p.format == Format::kBf16;
  const int num_vectors = payload_vectors(p.format, p.hidden);
  const int64_t row_bytes = bf16 ? int64_t(p.hidden) * 2 : p.hidden;
  uint8_t* recv_x = static_cast<uint8_t*>(p.recv_x);
  for (uint32_t todo = mine_mask; todo != 0; todo &= todo - 1) {
    const int k = __ffs(todo) - 1;
    const int64_t dst_row = int64_t(__shfl_sync(0xffffffffu, l, k)) * num_rows + __shfl_sync(0xffffffffu, row, k);
    store_chunk(recv_x + dst_row * row_bytes, u.part * kPartVectors, num_vectors, loaded.chunk);
  }
  if (u.part != 0) return;
  if (!bf16) {
    const uint8_t* scales = slot_address(p, u) + kHeaderBytes + p.hidden;
#pragma unroll
    for (int g = 0; g < kScaleGroups; ++g)
      store_scale_word(p, loaded.scale_words[g], 32 * g + lane, mine_mask, l, row, num_rows);
    for (int c0 = 32 * kScaleGroups; c0 < scale_columns(p); c0 += 32) {  // hidden > 8192
      const int c = c0 + lane;
      store_scale_word(p, c < scale_columns(p) ? load_scale_word(p, scales, c) : 0, c, mine_mask, l, row, num_rows);
    }
  }
  if (mine) {
    p.src_info[int64_t(l) * num_rows + row] = u.token;
    meta[int64_t(l) * num_rows + row] = static_cast<uint8_t>(lane);  // the token's first slot with this expert
  }
}

__global__ void __launch_bounds__(kRecvThreads) dispatch_recv_kernel(const __grid_constant__ DispatchParams p) {
  extern __shared__ __align__(16) uint8_t recv_smem[];
  const int R = p.c.num_ranks, L = p.num_local_experts;
  const int num_words = (p.max_tokens + 31) / 32;
  const PeerTable peers = peer_table_at(p.c, recv_smem);
  int32_t* first_rows =
      reinterpret_cast<int32_t*>(recv_smem + peer_table_bytes(R));  // [L][R]: first row of (expert, source)
  int32_t* tokens = first_rows + L * R;                             // [R]: tokens of each source, -1 masked
  uint32_t* token_bits = reinterpret_cast<uint32_t*>(tokens + R);   // [R][words]: which tokens came
  PhaseTrace trace;
  load_peer_table(p.c, peers);
  const ReceiveCounters counters{p.c.counters + kDispatchGate + p.parity, p.c.counters + kDispatchReaders + p.parity};
  uint32_t ticket = 0;
  if (!wait_for_sources(p.c, kDispatchFlags0 + p.parity, DevicePhase::kLowLatencyDispatchRecv, p.wait_stats, counters,
                        peers, ticket))
    return;
  trace.mark();
  uint8_t* meta = p.c.local + p.meta_offset;
  const int warps = blockDim.x / 32;
  const int parts = parts_per_slot(p.format, p.hidden);
  const int64_t num_units = int64_t(R) * p.max_tokens * parts;
  const int64_t first_unit = int64_t(blockIdx.x) * warps + threadIdx.x / 32;
  LoadedPart loaded;
  if (first_unit < num_units) load_part(p, unit_place(p, first_unit, parts), loaded);

  // Every message field in one pass of independent loads.
  const uint8_t* messages = p.c.local + p.messages_offset;
  auto message = [&](int s) { return reinterpret_cast<const int32_t*>(messages + s * p.message_bytes); };
  for (int s = threadIdx.x; s < R; s += blockDim.x) tokens[s] = peers.usable[s] ? __ldcg(message(s)) : -1;
  for (int i = threadIdx.x; i < L * R; i += blockDim.x) first_rows[i] = __ldcg(message(i % R) + 4 + i / R);
  for (int i = threadIdx.x; i < R * num_words; i += blockDim.x)
    token_bits[i] = __ldcg(reinterpret_cast<const uint32_t*>(message(i / num_words) + 4 + L) + i % num_words);
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int next = 0;
    for (int s = 0; s < R; ++s) {
      const int count = tokens[s] < 0 ? 0 : first_rows[l * R + s];
      first_rows[l * R + s] = next;
      if (blockIdx.x == 0) p.layout_range[int64_t(l) * R + s] = (int64_t(next) << 32) | int64_t(uint32_t(count));
      next += count;
    }
    if (blockIdx.x == 0) {
      p.recv_count[l] = next;
      if (p.cumulative_recv_stats != nullptr) p.cumulative_recv_stats[l] += next;
    }
  }
  __syncthreads();

  trace.mark();
  // Work units (see LoadedPart), one per warp at a time; the first unit's loads were issued before
  // the messages were read (it may turn out not to have come: then they are dropped).
  for (int64_t unit = first_unit; unit < num_units; unit += int64_t(gridDim.x) * warps) {
    const UnitPlace u = unit_place(p, unit, parts);
    const int s = u.source, t = u.token;
    if (t >= tokens[s] || ((token_bits[s * num_words + (t >> 5)] >> (t & 31)) & 1u) == 0) continue;
    if (unit != first_unit) load_part(p, u, loaded);
    store_part(p, u, loaded, first_rows, meta);
  }

  trace.mark();
  release_flags(p.c, kDispatchFlags0 + p.parity, counters, ticket);
  wait_for_preceding_grid();
  trace.print("dispatch_recv", p.c.rank, p.num_tokens, trace_counter(1));
}

size_t send_smem_bytes(const DispatchParams& p) {
  return peer_table_bytes(p.c.num_ranks) + sizeof(int32_t) * (size_t(p.num_topk) * p.num_tokens + p.num_experts);
}

size_t recv_smem_bytes(const DispatchParams& p) {
  const size_t words = (p.max_tokens + 31) / 32;
  return peer_table_bytes(p.c.num_ranks) +
         sizeof(int32_t) * (size_t(p.num_local_experts) * p.c.num_ranks + p.c.num_ranks * (1 + words));
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
  const int64_t units = int64_t(p.c.num_ranks) * p.max_tokens * parts_per_slot(p.format, p.hidden);
  const int warps = kRecvThreads / 32;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((units + warps - 1) / warps, num_sms)));
  launch_kernel(dispatch_recv_kernel, grid, kRecvThreads, recv_smem_bytes(p), stream, overlap_send, p);
}

void prepare_dispatch_kernels(int max_dynamic_smem) {
  allow_dynamic_smem(dispatch_send_kernel<int64_t>, max_dynamic_smem);
  allow_dynamic_smem(dispatch_send_kernel<int32_t>, max_dynamic_smem);
  allow_dynamic_smem(dispatch_recv_kernel, max_dynamic_smem);
}

}  // namespace epcomm::cuda::ll
