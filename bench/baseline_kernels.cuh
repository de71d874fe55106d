// The simple CUDA kernels a PyTorch program runs around its all_to_all_single: routing counts and
// positions (what a mask + cumsum / nonzero would compute), index_select of rows and index_add of
// rows. One params struct per kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace epcomm::bench {

struct RouteParams {
  const int64_t* topk_idx;  // [T, K], -1 = empty slot
  int tokens;               // T
  int topk;                 // K
  int local_experts;        // L: expert e lives on rank e / L
  int ranks;                // R
  int32_t* send_pos;        // [R, T] out: position of token t among those sent to rank r, or -1
  int32_t* send_count;      // [R] out: tokens sent to rank r
};
// One block per destination rank, scanning the tokens in order.
void launch_route(const RouteParams& params, cudaStream_t stream);

struct SendIndexParams {
  const int32_t* send_pos;    // [R, T]
  const int32_t* send_count;  // [R]
  int tokens;
  int ranks;
  int32_t* send_index;  // [sum of send_count] out: token of each packed row, by destination then token
};
void launch_send_index(const SendIndexParams& params, cudaStream_t stream);

struct IndexSelectParams {
  const void* src;       // [*, row_bytes]
  void* dst;             // [rows, row_bytes]
  const int32_t* index;  // [rows]: dst[i] = src[index[i]]
  int64_t rows;
  int64_t row_bytes;  // a multiple of 16
};
void launch_index_select(const IndexSelectParams& params, int num_sms, cudaStream_t stream);

struct IndexAddParams {
  const void* src;       // [rows, hidden] bf16
  void* dst;             // [*, hidden] bf16: dst[index[i]] += src[i] (bf16 atomics)
  const int32_t* index;  // [rows]
  int64_t rows;
  int64_t hidden;  // even
};
void launch_index_add(const IndexAddParams& params, int num_sms, cudaStream_t stream);

}  // namespace epcomm::bench
