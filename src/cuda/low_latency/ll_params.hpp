// What the host hands to the low-latency kernels: one params struct per operation (passed as a
// __grid_constant__ kernel parameter) and the layout of the control region. Plain C++ so that host
// files compiled without nvcc can fill the structs.
//
// Conventions: R ranks, L local experts, T tokens on this rank, K top-k, T_max tokens per rank,
// N = R x T_max rows per local expert, S = hidden / 128 scale groups. "symmetric" memory is the
// NVSHMEM allocation of num_rdma_bytes every rank has at the same offsets (core/layouts.hpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/layouts.hpp"
#include "core/numerics.hpp"  // EPCOMM_HOST_DEVICE
#include "cuda/device/error_word.cuh"

namespace epcomm::cuda::ll {

// The control region at offset 0 of the symmetric memory (kLowLatencyControlBytes).
//   | flags        | u64 [4][kMaxRanks]: dispatch parity 0/1, combine parity 0/1; [.][s] set by source s |
//   | counters     | u32 [kNumCounters]: receive-side reader counts and gates                      |
// Flags and counters return to zero after every call (the receiver clears what it consumed), so
// nothing that depends on a call count is baked into a CUDA graph, and zeroing the whole symmetric
// memory between calls (vLLM's get_local_buffer_tensor(...).zero_()) leaves them as they were. A
// flag sums the arrivals of the source's sending blocks (kernels/common.cuh, kFlagDone).
// What is not zero at rest lives outside the symmetric memory (LocalControlLayout).
enum Counter : int {
  kDispatchReaders = 0,  // + parity: receive blocks that have passed the wait
  kCombineReaders = 2,
  kDispatchGate = 4,  // enable_shrink: block 0 has settled who is masked for this call
  kCombineGate = 6,

  kNumCounters = 16,
};

enum FlagSet : int { kDispatchFlags0 = 0, kDispatchFlags1 = 1, kCombineFlags0 = 2, kCombineFlags1 = 3 };

struct ControlLayout {
  static constexpr int64_t kFlags = 0;
  static constexpr int64_t kCounters = kFlags + 4 * int64_t(kMaxRanks) * 8;
  static constexpr int64_t kResetEnd = kCounters + kNumCounters * 4;  // clean() zeroes [0, kResetEnd)
  static constexpr int64_t kEnd = kResetEnd;

  EPCOMM_HOST_DEVICE static constexpr int64_t flag(int set, int rank) {
    return kFlags + (int64_t(set) * kMaxRanks + rank) * 8;
  }
};

// The rank's own control state, in ordinary device memory apart from the symmetric memory (only this
// rank reads or writes it), so that no view of num_rdma_bytes can overwrite it.
//   | peer bases   | u64 [kMaxRanks]: rank r's symmetric memory as mapped here; 0 = use puts       |
//   | mask         | i32 [kMaxRanks]: 1 = rank is masked (enable_shrink)                           |
struct LocalControlLayout {
  static constexpr int64_t kPeerBases = 0;
  static constexpr int64_t kMask = kPeerBases + int64_t(kMaxRanks) * 8;
  static constexpr int64_t kEnd = kMask + int64_t(kMaxRanks) * 4;
};
static_assert(ControlLayout::kEnd <= kLowLatencyControlBytes, "control region too small");

// How recv_x is encoded.
enum class Format : int32_t { kBf16 = 0, kFp8 = 1, kFp8RoundScale = 2, kFp8Ue8m0 = 3 };

// What every kernel of a call needs to talk to the peers and report errors.
struct Common {
  uint8_t* local = nullptr;              // this rank's symmetric memory
  const uint64_t* peer_bases = nullptr;  // [R] (control region)
  int32_t* mask = nullptr;               // [R] (control region)
  uint32_t* counters = nullptr;          // [kNumCounters] (control region)
  DeviceErrorSink errors;                // the Buffer's error word, claim and abort flag (DeviceErrors::sink)
  uint64_t timeout_ns = 0;
  int32_t rank = 0;
  int32_t num_ranks = 1;
  int32_t shrink = 0;         // enable_shrink: a late rank is masked instead of failing
  int32_t has_put_peers = 0;  // some peer gets puts (peer_bases[r] == 0: not mapped, or the put path option)
};

struct DispatchParams {
  Common c;
  int32_t parity = 0;
  // inputs
  const uint16_t* x = nullptr;     // [T, hidden] bf16
  const void* topk_idx = nullptr;  // [T, K] int64 or int32
  int32_t topk_is_int64 = 1;
  int32_t num_tokens = 0;  // T
  int32_t hidden = 0;
  int32_t num_topk = 0;           // K <= kMaxLowLatencyTopk
  int32_t num_experts = 0;        // E
  int32_t num_local_experts = 0;  // L
  int32_t max_tokens = 0;         // T_max
  Format format = Format::kBf16;
  // symmetric memory, offsets from Common::local (same on every rank)
  int64_t recv_offset = 0;      // dispatch receive of this parity: [R][T_max] slots
  int64_t meta_offset = 0;      // row meta of this parity: u8 [L][N] (local only)
  int64_t messages_offset = 0;  // messages of this parity: [R] x message_bytes
  int64_t staging_offset = 0;   // [T_max] slots, then [R] messages (put peers only)
  int64_t slot_bytes = 0;
  int64_t message_bytes = 0;
  // outputs
  void* recv_x = nullptr;                    // [L, N, hidden] bf16 or fp8
  void* recv_scales = nullptr;               // fp8: f32 [L, S, N] or (ue8m0) i32 [L, S/4, N]
  int32_t* recv_count = nullptr;             // [L]
  int32_t* src_info = nullptr;               // [L, N]
  int64_t* layout_range = nullptr;           // [L, R]
  int32_t* cumulative_recv_stats = nullptr;  // [L] or null
  int64_t* wait_stats = nullptr;             // [R] or null, nanoseconds
};

struct CombineParams {
  Common c;
  int32_t parity = 0;  // combine parity (receive region and flags)
  // inputs
  const uint16_t* x = nullptr;            // [L, N, hidden] bf16: the caller's tensor or the zero-copy region
  uint16_t* staging = nullptr;            // [L, N, hidden] device memory the rows for put peers are copied to
  int32_t x_is_staging = 0;               // zero_copy: put straight from x (the zero-copy region)
  const int32_t* src_info = nullptr;      // [L, N] (handle)
  const int64_t* layout_range = nullptr;  // [L, R] (handle)
  const uint8_t* meta = nullptr;          // [L, N] top-k slot of each row (the dispatch's parity)
  const void* topk_idx = nullptr;         // [T, K]
  int32_t topk_is_int64 = 1;
  const float* topk_weights = nullptr;  // [T, K]
  uint16_t* out = nullptr;              // [T, hidden] bf16
  int64_t* wait_stats = nullptr;        // [R] or null
  int32_t num_tokens = 0;
  int32_t hidden = 0;
  int32_t num_topk = 0;
  int32_t num_experts = 0;
  int32_t num_local_experts = 0;
  int32_t max_tokens = 0;
  int64_t recv_offset = 0;  // combine receive of this parity: [T_max][kMaxLowLatencyTopk][hidden] bf16
};

// Limits of this implementation beyond SPEC's (checked on the host, kUnsupported).
constexpr int kMaxTokensPerRank = 1024;  // T_max: shared memory of the send kernel
constexpr int kMaxExperts = 8192;        // E: per-(expert, rank) tables in shared memory

// Launchers (dispatch.cu, combine.cu, control.cu). `num_sms` bounds the grids. A receive launched
// with `overlap_send` starts while the send kernel just before it on the stream still runs.
void launch_dispatch_send(const DispatchParams& params, int num_sms, cudaStream_t stream);
void launch_dispatch_recv(const DispatchParams& params, int num_sms, cudaStream_t stream, bool overlap_send);
void launch_combine_send(const CombineParams& params, int num_sms, cudaStream_t stream);
void launch_combine_recv(const CombineParams& params, int num_sms, cudaStream_t stream, bool overlap_send);
void launch_set_mask(int32_t* mask, int rank, int value, cudaStream_t stream);
// Lets the kernels use up to `max_dynamic_smem` bytes of dynamic shared memory (call once per device).
void prepare_dispatch_kernels(int max_dynamic_smem);
void prepare_combine_kernels(int max_dynamic_smem);

}  // namespace epcomm::cuda::ll
