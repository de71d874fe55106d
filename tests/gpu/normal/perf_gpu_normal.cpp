// Throughput probe of high-throughput mode on the `normal` workload of BENCHMARKS.md (4096 tokens per
// rank, hidden 7168, top-8 of 256 experts, one rank per GPU), for a sweep of SM counts and queue
// settings. Not a pass/fail test (disabled by default): scripts/gpu_suite.sh runs it with
// --gtest_also_run_disabled_tests and keeps the table. epcomm-bench is the tool for recorded figures.
//
// Each figure: cached dispatch (BF16, FP8) and combine timed with CUDA events on the caller's stream
// around one call, L2 flushed before it, ranks released together by a barrier; median of 30 after 5
// warm-ups. GB/s = bytes this rank receives (its own tokens included) / time, as BENCHMARKS.md counts.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>

#include "normal_support.hpp"
#include "support/gpu.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::normal {
namespace {

constexpr int kTokens = 4096, kHidden = 7168, kTopk = 8, kExperts = 256;
constexpr int kWarmups = 5, kIterations = 30;

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr ? std::atoi(value) : fallback;
}

// Median time (µs) of `call` over kIterations, each after an L2 flush and a group barrier.
template <class Call>
double median_us(Bootstrap& group, cudaStream_t stream, void* flush, size_t flush_bytes, Call&& call) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> times;
  for (int i = 0; i < kWarmups + kIterations; ++i) {
    cudaMemsetAsync(flush, i & 0xFF, flush_bytes, stream);
    cudaStreamSynchronize(stream);
    group.barrier();
    cudaEventRecord(start, stream);
    call();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    if (i >= kWarmups) times.push_back(ms * 1000.0);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

TEST(NormalModePerf, DISABLED_NormalWorkloadSweep) {
  const int R = std::min(visible_gpu_count(), env_int("EPCOMM_PERF_RANKS", 8));
  if (R < 2) GTEST_SKIP() << "needs 2 GPUs";
  const std::vector<int> sms_list = {8, 16, 24, 32};
  const std::vector<std::pair<int, int>> queue_list = {{6, 256}, {8, 256}, {16, 256}, {8, 128}};
  run_ranks(
      R,
      [&](Bootstrap& group) {
        const int rank = group.rank();
        const int device = select_device(rank);
        std::vector<Config> configs;
        for (int sms : sms_list)
          for (auto [send, recv] : queue_list) {
            Config c;
            c.num_sms = sms;
            c.num_max_nvl_chunked_send_tokens = send;
            c.num_max_nvl_chunked_recv_tokens = recv;
            configs.push_back(c);
          }
        Buffer gpu(group, gpu_options(R, kHidden * 2, configs, device));
        cudaStream_t stream;
        cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
        const StreamOptions on_stream{.stream = reinterpret_cast<StreamHandle>(stream)};
        const size_t flush_bytes = size_t(256) << 20;
        void* flush = nullptr;
        cudaMalloc(&flush, flush_bytes);

        // Inputs: topk of |randn| + 1 per rank (uniform load), bf16 and fp8 tokens, scales.
        std::mt19937_64 random(1234 + rank);
        std::vector<int64_t> topk(size_t(kTokens) * kTopk);
        for (int t = 0; t < kTokens; ++t) {
          std::set<int64_t> chosen;
          while (int(chosen.size()) < kTopk) chosen.insert(int64_t(random() % kExperts));
          std::copy(chosen.begin(), chosen.end(), topk.begin() + size_t(t) * kTopk);
        }
        std::vector<float> weights(size_t(kTokens) * kTopk, 0.125f);
        const std::vector<uint16_t> x_bf16 = random_bf16(size_t(kTokens) * kHidden, 99 + rank);
        std::vector<uint8_t> x_fp8(size_t(kTokens) * kHidden, 0x38);
        std::vector<float> scales(size_t(kTokens) * (kHidden / 128), 0.01f);
        DeviceCopy topk_d(topk.data(), topk.size() * 8), weights_d(weights.data(), weights.size() * 4);
        DeviceCopy xb_d(x_bf16.data(), x_bf16.size() * 2), xf_d(x_fp8.data(), x_fp8.size());
        DeviceCopy scales_d(scales.data(), scales.size() * 4);
        const Device dev = Device::cuda(device);
        DispatchInputs in;
        in.x = TensorView::contiguous(xb_d.data(), DType::kBFloat16, {kTokens, kHidden}, dev);
        in.topk_idx = TensorView::contiguous(topk_d.data(), DType::kInt64, {kTokens, kTopk}, dev);
        in.topk_weights = TensorView::contiguous(weights_d.data(), DType::kFloat32, {kTokens, kTopk}, dev);
        in.num_experts = kExperts;
        const TensorView fp8_x = TensorView::contiguous(xf_d.data(), DType::kFloat8E4M3, {kTokens, kHidden}, dev);
        const TensorView fp8_scales =
            TensorView::contiguous(scales_d.data(), DType::kFloat32, {kTokens, kHidden / 128}, dev);

        if (rank == 0)
          std::printf("%-14s %4s %5s %5s %10s %9s %9s %9s\n", "op", "sms", "chunk", "queue", "median_us", "GB/s_min",
                      "GB/s_med", "GB/s_max");
        for (const Config& config : configs) {
          in.config = config;
          const DispatchResult fresh = gpu.dispatch(in, on_stream);
          const double fresh_us = median_us(group, stream, flush, flush_bytes, [&] { gpu.dispatch(in, on_stream); });
          const int64_t rows = fresh.handle->num_recv_tokens;
          DispatchInputs cached;
          cached.x = in.x;
          cached.handle = fresh.handle.get();
          cached.config = config;
          const double bf16_us = median_us(group, stream, flush, flush_bytes, [&] { gpu.dispatch(cached, on_stream); });
          DispatchInputs cached_fp8 = cached;
          cached_fp8.x = fp8_x;
          cached_fp8.x_scales = fp8_scales;
          const double fp8_us =
              median_us(group, stream, flush, flush_bytes, [&] { gpu.dispatch(cached_fp8, on_stream); });
          CombineInputs combine;
          combine.x = fresh.recv_x;
          combine.handle = fresh.handle.get();
          combine.topk_weights = fresh.recv_topk_weights;
          combine.config = config;
          const double combine_us =
              median_us(group, stream, flush, flush_bytes, [&] { gpu.combine(combine, on_stream); });
          gpu.check_errors();

          const double bf16_bytes = double(rows) * kHidden * 2;
          const double fp8_bytes = double(rows) * (kHidden + kHidden / 128 * 4);
          const double mine[4][2] = {{fresh_us, bf16_bytes / fresh_us / 1e3},
                                     {bf16_us, bf16_bytes / bf16_us / 1e3},
                                     {fp8_us, fp8_bytes / fp8_us / 1e3},
                                     {combine_us, bf16_bytes / combine_us / 1e3}};
          std::vector<double> all(size_t(R) * 8);
          group.all_gather(mine, all.data(), sizeof(mine));
          const char* names[4] = {"dispatch_full", "dispatch_bf16", "dispatch_fp8", "combine"};
          for (int op = 0; op < 4 && rank == 0; ++op) {
            std::vector<double> gbps, us;
            for (int r = 0; r < R; ++r) {
              us.push_back(all[size_t(r) * 8 + op * 2]);
              gbps.push_back(all[size_t(r) * 8 + op * 2 + 1]);
            }
            std::sort(gbps.begin(), gbps.end());
            std::sort(us.begin(), us.end());
            std::printf("%-14s %4d %5d %5d %10.1f %9.1f %9.1f %9.1f\n", names[op], config.num_sms,
                        config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens, us[R / 2],
                        gbps.front(), gbps[R / 2], gbps.back());
          }
          if (rank == 0) std::fflush(stdout);
        }
        cudaFree(flush);
        cudaStreamDestroy(stream);
        gpu.destroy();
      },
      RunRanksOptions{.timeout = std::chrono::seconds(1200), .print_output_on_success = true});
}

}  // namespace
}  // namespace epcomm::testing::normal
