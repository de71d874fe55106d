#include <cuda_bf16.h>

#include <algorithm>

#include "baseline_kernels.cuh"
#include "cuda_errors.hpp"

namespace epcomm::bench {
namespace {

constexpr int kRouteThreads = 1024;
constexpr int kRowThreads = 256;

__device__ bool goes_to(const RouteParams& p, int token, int rank) {
  bool any = false;
  for (int k = 0; k < p.topk; ++k) {
    const int64_t e = p.topk_idx[int64_t(token) * p.topk + k];
    any = any || (e >= 0 && e / p.local_experts == rank);
  }
  return any;
}

// Block-wide exclusive scan of 0/1 flags over tiles of the tokens: keeps the token order.
__global__ void __launch_bounds__(kRouteThreads) route_kernel(const __grid_constant__ RouteParams p) {
  __shared__ int warp_totals[kRouteThreads / 32];
  const int rank = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int base = 0;
  for (int tile = 0; tile < p.tokens; tile += kRouteThreads) {
    const int token = tile + threadIdx.x;
    const bool flag = token < p.tokens && goes_to(p, token, rank);
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, flag);
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kRouteThreads / 32; ++w) {
      before += w < warp ? warp_totals[w] : 0;
      total += warp_totals[w];
    }
    if (token < p.tokens)
      p.send_pos[int64_t(rank) * p.tokens + token] = flag ? base + before + __popc(ballot & ((1u << lane) - 1u)) : -1;
    base += total;
    __syncthreads();  // warp_totals is rewritten by the next tile
  }
  if (threadIdx.x == 0) p.send_count[rank] = base;
}

__global__ void send_index_kernel(const __grid_constant__ SendIndexParams p) {
  extern __shared__ int32_t offsets[];  // [R]: first packed row of each destination
  if (threadIdx.x == 0) {
    int32_t running = 0;
    for (int r = 0; r < p.ranks; ++r) {
      offsets[r] = running;
      running += p.send_count[r];
    }
  }
  __syncthreads();
  const int64_t total = int64_t(p.ranks) * p.tokens;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t pos = p.send_pos[i];
    if (pos >= 0) p.send_index[offsets[i / p.tokens] + pos] = static_cast<int32_t>(i % p.tokens);
  }
}

__global__ void __launch_bounds__(kRowThreads) index_select_kernel(const __grid_constant__ IndexSelectParams p) {
  const int64_t vectors = p.row_bytes / 16;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const uint4* src = static_cast<const uint4*>(p.src) + int64_t(p.index[row]) * vectors;
    uint4* dst = static_cast<uint4*>(p.dst) + row * vectors;
    for (int64_t v = threadIdx.x; v < vectors; v += kRowThreads) dst[v] = src[v];
  }
}

__global__ void __launch_bounds__(kRowThreads) index_add_kernel(const __grid_constant__ IndexAddParams p) {
  const int64_t pairs = p.hidden / 2;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const __nv_bfloat162* src = static_cast<const __nv_bfloat162*>(p.src) + row * pairs;
    __nv_bfloat162* dst = static_cast<__nv_bfloat162*>(p.dst) + int64_t(p.index[row]) * pairs;
    for (int64_t v = threadIdx.x; v < pairs; v += kRowThreads) atomicAdd(dst + v, src[v]);
  }
}

int row_blocks(int64_t rows, int num_sms) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t(num_sms) * 8)));
}

}  // namespace

void launch_route(const RouteParams& params, cudaStream_t stream) {
  route_kernel<<<params.ranks, kRouteThreads, 0, stream>>>(params);
  check_cuda(cudaGetLastError(), "route_kernel launch");
}

void launch_send_index(const SendIndexParams& params, cudaStream_t stream) {
  const int64_t total = int64_t(params.ranks) * params.tokens;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 1024));
  send_index_kernel<<<blocks, 256, params.ranks * sizeof(int32_t), stream>>>(params);
  check_cuda(cudaGetLastError(), "send_index_kernel launch");
}

void launch_index_select(const IndexSelectParams& params, int num_sms, cudaStream_t stream) {
  if (params.rows == 0) return;
  index_select_kernel<<<row_blocks(params.rows, num_sms), kRowThreads, 0, stream>>>(params);
  check_cuda(cudaGetLastError(), "index_select_kernel launch");
}

void launch_index_add(const IndexAddParams& params, int num_sms, cudaStream_t stream) {
  if (params.rows == 0) return;
  index_add_kernel<<<row_blocks(params.rows, num_sms), kRowThreads, 0, stream>>>(params);
  check_cuda(cudaGetLastError(), "index_add_kernel launch");
}

}  // namespace epcomm::bench
