// The multi-rank harness on GPUs: every rank (a forked child of a parent that never touched CUDA)
// can select its own GPU, allocate and copy, and the ranks see distinct devices.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "support/gpu.hpp"
#include "support/multirank.hpp"

namespace epcomm {
namespace {

TEST(GpuHarness, EachRankDrivesItsOwnGpu) {
  EPCOMM_REQUIRE_GPUS(1);
  const int num_ranks = std::min(testing::visible_gpu_count(), 8);
  const unsigned seed = std::random_device{}();
  testing::run_ranks(num_ranks, [&](Bootstrap& group) {
    ASSERT_EQ(cudaSetDevice(group.rank()), cudaSuccess);
    // Every rank names its device; all must differ.
    char bus_id[32] = {};
    ASSERT_EQ(cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), group.rank()), cudaSuccess);
    std::vector<char> all(sizeof(bus_id) * group.size());
    group.all_gather(bus_id, all.data(), sizeof(bus_id));
    std::set<std::string> distinct;
    for (int r = 0; r < group.size(); ++r) distinct.insert(std::string(all.data() + r * sizeof(bus_id)));
    EXPECT_EQ(distinct.size(), static_cast<size_t>(group.size())) << "two ranks share a GPU";
    // A round trip through device memory of rank-specific random data.
    std::mt19937 random(seed + group.rank());
    std::vector<uint32_t> host(1 << 20), back(host.size(), 0xDEADBEEF);
    for (auto& v : host) v = random();
    void* device = nullptr;
    ASSERT_EQ(cudaMalloc(&device, host.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(device, host.data(), host.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(back.data(), device, back.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(back, host);
    EXPECT_EQ(cudaFree(device), cudaSuccess);
    group.barrier();
  });
}

}  // namespace
}  // namespace epcomm
