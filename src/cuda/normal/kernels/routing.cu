// Token analysis (SPEC §3.1): where each token goes, counted per rank, node and expert, with every
// topk_idx value checked. Serves get_dispatch_layout and the first step of a fresh dispatch, where
// block b's token range is channel b's, so its per-rank counts are the channel counts the senders
// need to place their rows.
//
// A bad index (outside [-1, E)) is reported (kBadIndex) and treated as -1: the kernels of the call
// still finish, so the peers of a dispatch are not left waiting; the host then throws.
#include "cuda/device/launch.hpp"
#include "cuda/normal/kernels/common.cuh"
#include "cuda/normal/launch.hpp"

namespace epcomm::cuda {
namespace kernels {
namespace {

constexpr int kSharedExperts = 8192;  // per-expert counts go through shared memory up to this E

struct SharedCounts {
  int32_t* ranks;    // [R]
  int32_t* nodes;    // [N]
  int32_t* experts;  // [E] or null (then straight to global memory)
  int32_t* routed;   // [1]
};

// Routing from the caller's is_token_in_rank: one thread per token.
__device__ void route_by_flags(const RoutingParams& p, TokenRange range, const SharedCounts& s) {
  const int R = p.num_ranks;
  for (int t = range.begin + threadIdx.x; t < range.end; t += blockDim.x) {
    bool any = false;
    for (int r = 0; r < R; ++r) {
      if (p.in_rank_given[int64_t(t) * R + r] == 0) continue;
      p.in_rank[int64_t(t) * R + r] = 1;
      atomicAdd(&s.ranks[r], 1);
      any = true;
    }
    if (any) atomicAdd(s.routed, 1);
  }
}

// Routing from topk_idx (and the per-expert counts): 32 / K tokens per warp, one lane per slot, so
// that a token's slots are in one warp and __match_any_sync finds its distinct ranks and nodes.
__device__ void route_by_topk(const RoutingParams& p, TokenRange range, const SharedCounts& s) {
  const int K = p.num_topk, R = p.num_ranks, E = p.num_experts;
  const int L = E / R;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const int tokens_per_warp = kWarpSize / K;
  const int token_in_warp = lane / K, slot = lane % K;
  const bool lane_used = token_in_warp < tokens_per_warp;
  const bool decide_ranks = p.in_rank_given == nullptr;

  for (int first = range.begin + warp * tokens_per_warp; first < range.end; first += num_warps * tokens_per_warp) {
    const int t = first + token_in_warp;
    const bool live = lane_used && t < range.end;
    int64_t expert = -1;
    if (live) {
      expert = load_topk(p.topk_idx, p.topk_is_int64 != 0, int64_t(t) * K + slot);
      if (expert < -1 || expert >= E) {
        device::report_error(p.errors, DeviceErrorKind::kBadIndex, p.phase, t, expert, E * 32 + slot);
        expert = -1;
      }
    }
    const bool valid = expert >= 0;
    if (valid && p.expert_counts != nullptr) atomicAdd(s.experts ? &s.experts[expert] : &p.expert_counts[expert], 1);
    if (!decide_ranks) continue;

    // Distinct ranks (then nodes) of each token: the lowest lane holding a value counts it.
    const int rank = valid ? static_cast<int>(expert / L) : -1;
    const uint32_t rank_key = valid ? uint32_t(token_in_warp * 2048 + rank) : (0x40000000u | lane);
    const uint32_t same_rank = __match_any_sync(~0u, rank_key);
    if (valid && __ffs(same_rank) - 1 == lane) {
      p.in_rank[int64_t(t) * R + rank] = 1;
      atomicAdd(&s.ranks[rank], 1);
    }
    if (p.node_counts != nullptr) {
      const int node = valid ? rank / p.ranks_per_node : -1;
      const uint32_t node_key = valid ? uint32_t(token_in_warp * 2048 + node) : (0x40000000u | lane);
      const uint32_t same_node = __match_any_sync(~0u, node_key);
      if (valid && __ffs(same_node) - 1 == lane) atomicAdd(&s.nodes[node], 1);
    }
    // A token with any valid slot is routed somewhere.
    const uint64_t valid_lanes = __ballot_sync(~0u, valid);
    const uint64_t token_lanes = ((uint64_t(1) << K) - 1) << (token_in_warp * K);
    if (live && slot == 0 && (valid_lanes & token_lanes) != 0) atomicAdd(s.routed, 1);
  }
}

__global__ void __launch_bounds__(kRoutingThreads) routing_kernel(const __grid_constant__ RoutingParams p) {
  extern __shared__ int32_t shared[];
  const int R = p.num_ranks, N = R / p.ranks_per_node;
  const bool experts_shared = p.expert_counts != nullptr && p.num_experts <= kSharedExperts;
  const SharedCounts s{shared, shared + R, experts_shared ? shared + R + N : nullptr,
                       shared + R + N + (experts_shared ? p.num_experts : 0)};
  const int num_shared = R + N + (experts_shared ? p.num_experts : 0) + 1;
  for (int i = threadIdx.x; i < num_shared; i += blockDim.x) shared[i] = 0;
  __syncthreads();

  const TokenRange range = channel_tokens(p.num_tokens, gridDim.x, blockIdx.x);
  if (p.in_rank_given != nullptr) route_by_flags(p, range, s);
  if (p.topk_idx != nullptr) route_by_topk(p, range, s);
  __syncthreads();

  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if (p.block_rank_counts != nullptr) p.block_rank_counts[blockIdx.x * kMaxNvlRanks + r] = s.ranks[r];
    if (p.rank_counts != nullptr && s.ranks[r] != 0) atomicAdd(&p.rank_counts[r], s.ranks[r]);
  }
  if (p.node_counts != nullptr)
    for (int n = threadIdx.x; n < N; n += blockDim.x)
      if (s.nodes[n] != 0) atomicAdd(&p.node_counts[n], s.nodes[n]);
  if (experts_shared)
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x)
      if (s.experts[e] != 0) atomicAdd(&p.expert_counts[e], s.experts[e]);
  if (p.routed_tokens != nullptr && threadIdx.x == 0 && *s.routed != 0) atomicAdd(p.routed_tokens, *s.routed);
}

}  // namespace
}  // namespace kernels

void launch_routing(const RoutingParams& params, int num_blocks, cudaStream_t stream) {
  const int N = params.num_ranks / params.ranks_per_node;
  const bool experts_shared = params.expert_counts != nullptr && params.num_experts <= kernels::kSharedExperts;
  const size_t shared_bytes = sizeof(int32_t) * (params.num_ranks + N + (experts_shared ? params.num_experts : 0) + 1);
  launch_kernel(kernels::routing_kernel, num_blocks, kRoutingThreads, shared_bytes, stream, /*overlap_previous=*/false,
                params);
}

}  // namespace epcomm::cuda
