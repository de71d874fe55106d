// The "expert" of the low-latency CUDA-graph test: reads the valid rows of a bf16 dispatch and
// writes fake_expert_value of each element (see ll_support.hpp), reading the counts on the device
// so that a captured graph follows the routing of each replay.
#include "ll_support.hpp"

namespace epcomm::testing::ll {
namespace {

__global__ void fake_expert_kernel(const uint16_t* in, uint16_t* out, const int32_t* counts, int64_t rows_per_expert,
                                   int hidden) {
  const int l = blockIdx.y;
  const int64_t elements = int64_t(counts[l]) * hidden;
  const int64_t base = int64_t(l) * rows_per_expert * hidden;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < elements; i += int64_t(gridDim.x) * blockDim.x)
    out[base + i] = l % 2 ? uint16_t(in[base + i] ^ 0x8000u) : in[base + i];
}

__global__ void sleep_kernel(uint64_t nanoseconds) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < nanoseconds);
}

}  // namespace

void launch_gpu_sleep(uint64_t nanoseconds, cudaStream_t stream) {
  sleep_kernel<<<1, 1, 0, stream>>>(nanoseconds);
  cuda_check(cudaGetLastError(), "sleep_kernel");
}

void launch_fake_expert(const uint16_t* in, uint16_t* out, const int32_t* counts, int num_local_experts,
                        int64_t rows_per_expert, int hidden, cudaStream_t stream) {
  fake_expert_kernel<<<dim3(64, num_local_experts), 256, 0, stream>>>(in, out, counts, rows_per_expert, hidden);
  cuda_check(cudaGetLastError(), "fake_expert_kernel");
}

}  // namespace epcomm::testing::ll
