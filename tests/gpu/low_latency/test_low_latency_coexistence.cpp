// Normal mode, then low-latency mode, in one process: one CUDA Buffer with both num_nvl_bytes and
// num_rdma_bytes when the CUDA backend takes that, else two Buffers. Both compared with the CPU
// reference.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>

#include "core/numerics.hpp"
#include "ll_support.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::ll {
namespace {

struct NormalOut {
  std::vector<uint8_t> recv_x;
  std::vector<int> per_expert;
  std::vector<uint16_t> combined;
};

std::vector<uint8_t> read_contiguous(const TensorView& t) {
  std::vector<uint8_t> bytes(t.nbytes());
  if (bytes.empty()) return bytes;
  if (t.device.is_cuda()) {
    cuda_check(cudaMemcpy(bytes.data(), t.data, bytes.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
  } else {
    std::memcpy(bytes.data(), t.data, bytes.size());
  }
  return bytes;
}

// Normal dispatch of `v` then combine of the received rows (unchanged) on one side.
NormalOut normal_round_trip(Buffer& buffer, const Views& v, int num_experts, cudaStream_t stream) {
  DispatchInputs di;
  di.x = v.x;
  di.topk_idx = v.topk;
  di.topk_weights = v.weights;
  di.num_experts = num_experts;
  StreamOptions so;
  so.stream = stream;
  DispatchResult d = buffer.dispatch(di, so);
  CombineInputs ci;
  ci.x = d.recv_x;
  ci.handle = d.handle.get();
  CombineResult cmb = buffer.combine(ci, so);
  if (stream != nullptr) cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  NormalOut out;
  out.recv_x = read_contiguous(d.recv_x);
  out.per_expert = d.num_recv_tokens_per_expert;
  out.combined = read_bf16(cmb.combined_x);
  return out;
}

TEST(LowLatencyGpu, NormalModeThenLowLatencyModeInOneProcess) {
  const std::vector<int> counts = rank_counts();
  if (counts.empty()) GTEST_SKIP() << "needs 2 GPUs";
  const int R = counts.back();
  RunRanksOptions options;
  options.timeout = std::chrono::seconds(600);
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int rank = group.rank();
        Case c;
        c.experts = 32 * R, c.format = Format::kBf16;
        const int device = rank % visible_gpus();
        cuda_check(cudaSetDevice(device), "cudaSetDevice");
        BufferOptions o;
        o.num_nvl_bytes = default_dispatch_config(R).nvl_buffer_size_hint(int64_t(c.hidden) * 2, R);
        o.num_rdma_bytes = low_latency_buffer_size_hint(c.max_tokens, c.hidden, R, c.experts);
        o.low_latency_mode = true;
        o.backend = BackendKind::kCpu;
        Buffers b;
        b.device = device;
        b.cpu = std::make_unique<Buffer>(group, o);
        o.backend = BackendKind::kCuda;
        o.device = device;
        // One Buffer with both kinds of memory, or (backend without that) two Buffers.
        std::unique_ptr<Buffer> normal;
        bool one_buffer = true;
        try {
          b.gpu = std::make_unique<Buffer>(group, o);
        } catch (const Error& e) {
          if (rank == 0) std::printf("[coexistence] one Buffer with both modes refused (%s): two Buffers\n", e.what());
          one_buffer = false;
        }
        if (!one_buffer) {
          BufferOptions normal_only = o;
          normal_only.num_rdma_bytes = 0;
          normal_only.low_latency_mode = false;
          normal = std::make_unique<Buffer>(group, normal_only);
          BufferOptions ll_only = o;
          ll_only.num_nvl_bytes = 0;
          b.gpu = std::make_unique<Buffer>(group, ll_only);
        }
        cuda_check(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking), "cudaStreamCreate");

        Inputs in = make_inputs(c, rank, R, 1300);
        Views hv = host_views(in, c), dv = device_views(in, c, b.stream);
        const NormalOut expected = normal_round_trip(*b.cpu, hv, c.experts, nullptr);
        const NormalOut actual = normal_round_trip(one_buffer ? *b.gpu : *normal, dv, c.experts, b.stream);
        const std::string what = "rank " + std::to_string(rank) + " normal mode";
        EXPECT_EQ(expected.per_expert, actual.per_expert) << what << ": num_recv_tokens_per_expert";
        EXPECT_TRUE(expected.recv_x == actual.recv_x) << what << ": recv_x differs";
        expect_same_bf16(expected.combined, actual.combined, c.hidden, what + " combine");

        check_case(b, c, rank, R, 1301);
        Case fp8 = c;
        fp8.format = Format::kFp8;
        check_case(b, fp8, rank, R, 1302);
        if (normal) normal->destroy();
        b.destroy();
      },
      options);
}

}  // namespace
}  // namespace epcomm::testing::ll
