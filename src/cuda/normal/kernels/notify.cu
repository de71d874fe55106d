// The count exchange of a fresh dispatch (one block), which is also the call's entry barrier:
//   1. this rank's tokens per receiver (sum of the channel counts of the routing kernel) and the
//      channel prefixes the senders start from; the caller's layout tensors are checked against them;
//   2. our call record (signature, T, num_worst_tokens, counts) and the per-expert counts of each
//      receiver's experts go into every peer, the record's epoch last (release);
//   3. wait for every peer's record (acquire), bounded;
//   4. rank_prefix_matrix and the handle's meta, the num_worst_tokens check (every rank checks every
//      receiver, so all raise it together), and for the host: tokens and per-expert counts received.
#include "cuda/device/launch.hpp"
#include "cuda/normal/kernels/common.cuh"
#include "cuda/normal/launch.hpp"

namespace epcomm::cuda {
namespace kernels {
namespace {

__device__ void report_count_mismatch(const NotifyParams& p, int which, int entry, int32_t given, int32_t derived) {
  device::report_error(p.common.errors, DeviceErrorKind::kBadCount, DevicePhase::kNotify, entry,
                       static_cast<int64_t>((uint64_t(uint32_t(given)) << 32) | uint32_t(derived)), which);
}

// Step 1 (threads r < R): tokens to rank r, and where each channel's run of them starts.
__device__ void count_own_tokens(const NotifyParams& p, int32_t* counts) {
  const NormalCommon& c = p.common;
  const int r = threadIdx.x;
  if (r < c.num_ranks) {
    int32_t sum = 0;
    for (int channel = 0; channel < c.queues.num_channels; ++channel) {
      c.state->channel_prefix[channel][r] = sum;
      sum += c.state->channel_counts[channel][r];
    }
    counts[r] = sum;
    if (p.check_rank_counts != nullptr && p.check_rank_counts[r] != sum)
      report_count_mismatch(p, 0, r, p.check_rank_counts[r], sum);
  }
  if (threadIdx.x == 0 && p.check_node_counts != nullptr && *p.check_node_counts != c.state->routed_tokens)
    report_count_mismatch(p, 1, 0, *p.check_node_counts, c.state->routed_tokens);
  if (p.check_expert_counts != nullptr)
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x)
      if (p.check_expert_counts[e] != p.expert_counts[e])
        report_count_mismatch(p, 2, e, p.check_expert_counts[e], p.expert_counts[e]);
}

// Step 2: our record and expert counts into every peer; the epochs after a barrier.
__device__ void announce(const NotifyParams& p, const int32_t* counts, uint64_t epoch, int parity) {
  const NormalCommon& c = p.common;
  const int L = p.num_local_experts;
  for (int dst = 0; dst < c.num_ranks; ++dst) {
    auto* record = at_offset<CallRecord>(c.peers[dst], call_record_offset(parity, c.rank));
    if (threadIdx.x == 0) {
      record->signature = p.signature;
      record->geometry = queue_signature(c.queues.num_channels, c.queues.queue_tokens);
      record->handle_epoch = 0;
      record->num_tokens = p.num_tokens;
      record->num_worst_tokens = p.num_worst_tokens;
    }
    if (threadIdx.x < c.num_ranks) record->counts[threadIdx.x] = counts[threadIdx.x];
    auto* experts = at_offset<int32_t>(c.peers[dst], expert_counts_offset(parity, c.rank));
    for (int l = threadIdx.x; l < L; l += blockDim.x) experts[l] = p.expert_counts[dst * L + l];
  }
  __syncthreads();  // orders every thread's writes before the releases below
  if (threadIdx.x < c.num_ranks) {
    auto* record = at_offset<CallRecord>(c.peers[threadIdx.x], call_record_offset(parity, c.rank));
    device::store_release_sys(&record->epoch, epoch);
  }
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(const __grid_constant__ NotifyParams p) {
  const NormalCommon& c = p.common;
  const int R = c.num_ranks, me = c.rank, tid = threadIdx.x;
  __shared__ int32_t counts[kMaxNvlRanks];
  __shared__ int32_t matrix[kMaxNvlRanks][kMaxNvlRanks];  // [source][receiver]
  __shared__ int32_t tokens_of[kMaxNvlRanks], worst_of[kMaxNvlRanks], received_by[kMaxNvlRanks];
  __shared__ int failed, mismatch_rank;

  const uint64_t epoch = read_epoch(c.state) + 1;
  const int parity = static_cast<int>(epoch & 1);
  if (tid == 0) {
    failed = 0;
    mismatch_rank = kMaxNvlRanks;
  }
  count_own_tokens(p, counts);
  __syncthreads();
  announce(p, counts, epoch, parity);

  // Step 3: every source's record (thread s waits for source s).
  const char* mine = c.peers[me];
  if (tid < R) {
    const auto* record = at_offset<const CallRecord>(mine, call_record_offset(parity, tid));
    uint64_t seen = 0;
    const bool arrived = device::wait_or_report(
        &record->epoch, [&](uint64_t value) { return value >= epoch; }, seen, c.timeout_ns, c.errors,
        WaitSite{DevicePhase::kNotify, tid});
    if (!arrived) {
      atomicOr(&failed, 1);
    } else {
      for (int r = 0; r < R; ++r) matrix[tid][r] = __ldcg(&record->counts[r]);
      tokens_of[tid] = __ldcg(&record->num_tokens);
      worst_of[tid] = __ldcg(&record->num_worst_tokens);
      const bool same = __ldcg(reinterpret_cast<const unsigned long long*>(&record->signature)) == p.signature &&
                        __ldcg(reinterpret_cast<const unsigned long long*>(&record->geometry)) ==
                            queue_signature(c.queues.num_channels, c.queues.queue_tokens);
      if (!same) atomicMin(&mismatch_rank, tid);
    }
  }
  __syncthreads();
  if (failed) {
    if (tid == 0) {
      c.state->skip = 1;
      *reinterpret_cast<volatile uint64_t*>(&c.state->epoch) = epoch;
    }
    return;
  }
  const bool mismatch = mismatch_rank < kMaxNvlRanks;
  if (mismatch && tid == 0) {
    const auto* record = at_offset<const CallRecord>(mine, call_record_offset(parity, mismatch_rank));
    const uint64_t theirs = __ldcg(reinterpret_cast<const unsigned long long*>(&record->signature));
    device::report_error(
        c.errors, DeviceErrorKind::kMismatch, DevicePhase::kNotify, mismatch_rank,
        static_cast<int64_t>(
            theirs == p.signature ? __ldcg(reinterpret_cast<const unsigned long long*>(&record->geometry)) : theirs),
        theirs == p.signature ? 2 : 0);
  }

  // Step 4: the handle.
  if (tid < R) {
    int32_t sum = 0;
    for (int source = 0; source < R; ++source) {
      sum += matrix[source][tid];
      p.rank_prefix_matrix[source * R + tid] = sum;
    }
    received_by[tid] = sum;
    p.handle_meta[tid] = tokens_of[tid];
  }
  if (tid == 0) {
    p.handle_meta[R] = static_cast<int32_t>(epoch & 0xFFFFFFFF);
    p.handle_meta[R + 1] = static_cast<int32_t>(epoch >> 32);
  }
  __syncthreads();
  if (tid == 0 && !mismatch) {
    for (int offset = 0; offset < R; ++offset) {  // our own rank first: its message is the most useful
      const int r = (me + offset) % R;
      if (worst_of[r] > 0 && received_by[r] > worst_of[r]) {
        device::report_error(c.errors, DeviceErrorKind::kCapacity, DevicePhase::kNotify, r, received_by[r],
                             worst_of[r]);
        break;
      }
    }
  }
  if (p.host != nullptr) {
    volatile HostCounts* host = p.host;
    for (int l = tid; l < p.num_local_experts; l += blockDim.x) {
      int32_t sum = 0;
      for (int source = 0; source < R; ++source)
        sum += __ldcg(at_offset<const int32_t>(mine, expert_counts_offset(parity, source)) + l);
      host->num_recv_per_expert[l] = sum;
    }
    if (tid == 0) host->num_recv = received_by[me];
    __syncthreads();
    if (tid == 0) {
      __threadfence_system();
      host->ready = p.host_sequence;
    }
  }
  if (tid == 0) {
    c.state->skip = mismatch ? 1 : 0;
    *reinterpret_cast<volatile uint64_t*>(&c.state->epoch) = epoch;
  }
}

}  // namespace
}  // namespace kernels

void launch_notify(const NotifyParams& params, cudaStream_t stream) {
  launch_kernel(kernels::notify_kernel, 1, kNotifyThreads, 0, stream, /*overlap_previous=*/false, params);
}

}  // namespace epcomm::cuda
