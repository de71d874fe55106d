// Indicative timings of low-latency mode at the benchmark shapes (BENCHMARKS.md `ll`, `ll-small`);
// runs only with EPCOMM_LL_TIMING=1. The official figures come from epcomm-bench.
//
// Each timed call is queued behind a 30 us GPU sleep so that host launch costs stay out of the
// CUDA-event interval; calls run back to back, so after the first iteration the ranks are in step.
// Reported per metric: the median over iterations on each rank, then min / median / max over ranks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>

#include "ll_support.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::ll {
namespace {

constexpr int kWarmup = 10;
constexpr int kIterations = 50;
constexpr uint64_t kSleepNs = 30'000;

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0f : v[v.size() / 2];
}

class Timer {
 public:
  Timer(Bootstrap& group, cudaStream_t stream) : group_(group), stream_(stream) {
    for (auto& e : events_) cuda_check(cudaEventCreate(&e), "cudaEventCreate");
  }
  ~Timer() {
    for (auto& e : events_) cudaEventDestroy(e);
  }
  cudaEvent_t event(int i) { return events_[i]; }

  // Runs `body(timer)` kWarmup + kIterations times; body records events 0..n. Returns, per interval
  // i (event i -> i + 1), the median over iterations, in microseconds.
  std::vector<float> run(int intervals, const std::function<void()>& body) {
    std::vector<std::vector<float>> samples(intervals);
    for (int it = 0; it < kWarmup + kIterations; ++it) {
      launch_gpu_sleep(kSleepNs, stream_);
      body();
      cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      if (it < kWarmup) continue;
      for (int i = 0; i < intervals; ++i) {
        float ms = 0;
        cuda_check(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]), "cudaEventElapsedTime");
        samples[i].push_back(ms * 1000.0f);
      }
    }
    std::vector<float> medians;
    for (auto& s : samples) medians.push_back(median(s));
    return medians;
  }

  // Prints min / median / max over ranks of `value` (rank 0 prints).
  void report(const std::string& metric, float us, double bytes) {
    std::vector<float> all(group_.size());
    group_.all_gather(&us, all.data(), sizeof(float));
    if (group_.rank() != 0) return;
    std::sort(all.begin(), all.end());
    const float mid = all[all.size() / 2];
    std::printf("[ll-timing] %-34s ranks=%d  median %7.2f us  (min %7.2f, max %7.2f)", metric.c_str(), group_.size(),
                mid, all.front(), all.back());
    if (bytes > 0) std::printf("  %6.1f GB/s", bytes / (mid * 1e-6) / 1e9);
    std::printf("\n");
  }

 private:
  Bootstrap& group_;
  cudaStream_t stream_;
  cudaEvent_t events_[4] = {};
};

TEST(LowLatencyGpuTiming, BenchmarkShapes) {
  if (std::getenv("EPCOMM_LL_TIMING") == nullptr) GTEST_SKIP() << "set EPCOMM_LL_TIMING=1";
  const std::vector<int> counts = rank_counts();
  if (counts.empty()) GTEST_SKIP() << "needs 2 GPUs";
  const int R = counts.back();
  RunRanksOptions options;
  options.timeout = std::chrono::seconds(600);
  options.print_output_on_success = true;
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int rank = group.rank();
        Case c;
        c.experts = R == 8 ? 256 : 32 * R;
        const int L = c.experts / R;
        const int64_t N = int64_t(R) * c.max_tokens;
        const int device = rank % visible_gpus();
        cuda_check(cudaSetDevice(device), "cudaSetDevice");
        BufferOptions bo;
        bo.backend = BackendKind::kCuda;
        bo.num_rdma_bytes = low_latency_buffer_size_hint(c.max_tokens, c.hidden, R, c.experts);
        bo.low_latency_mode = true;
        bo.device = device;
        Buffer buffer(group, bo);
        cudaStream_t stream = nullptr;
        cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        ArenaAllocator arena(size_t(1) << 30);
        Side side{&buffer, true, stream, &arena};
        DeviceMemory experts = DeviceMemory::allocate(size_t(L) * N * c.hidden * 2);
        cuda_check(cudaMemset(experts.get(), 0x3C, size_t(L) * N * c.hidden * 2), "cudaMemset");
        const TensorView experts_view =
            TensorView::contiguous(experts.get(), DType::kBFloat16, {L, N, int64_t(c.hidden)}, Device::cuda(device));
        Timer timer(group, stream);

        auto combine_call = [&](const Case& cc, const Views& v, const LowLatencyHandle& handle, bool hook) {
          LowLatencyCombineInputs in;
          in.x = experts_view;
          in.topk_idx = v.topk;
          in.topk_weights = v.weights;
          in.handle = &handle;
          LowLatencyOptions o;
          o.stream = stream;
          o.allocator = &arena;
          o.return_recv_hook = hook;
          (void)cc;
          return buffer.low_latency_combine(in, o);
        };
        // Slot count for BENCHMARKS.md's byte formulas: (token, non-(-1) slot) pairs of this rank.
        auto slots = [](const Inputs& in) {
          return double(std::count_if(in.topk.begin(), in.topk.end(), [](int64_t e) { return e >= 0; }));
        };

        for (int tokens : {128, 1}) {
          Case cc = c;
          cc.tokens = tokens;
          Inputs in = make_inputs(cc, rank, R, 42);
          Views v = device_views(in, cc, stream);
          const double fp8_bytes = slots(in) * (cc.hidden + cc.hidden / 128 * 4 + 16);
          const double bf16_bytes = slots(in) * cc.hidden * 2;
          const std::string shape = " T=" + std::to_string(tokens);
          LowLatencyDispatchResult held;
          auto dispatch_timed = [&](Format format, bool hook) {
            Case dc = cc;
            dc.format = format;
            dc.hook = hook;
            return timer.run(hook ? 2 : 1, [&] {
              arena.reset();
              cuda_check(cudaEventRecord(timer.event(0), stream), "cudaEventRecord");
              held = dispatch(side, v, dc);
              cuda_check(cudaEventRecord(timer.event(1), stream), "cudaEventRecord");
              if (hook) {
                held.hook(stream);
                cuda_check(cudaEventRecord(timer.event(2), stream), "cudaEventRecord");
              }
            });
          };
          timer.report("dispatch fp8" + shape, dispatch_timed(Format::kFp8, false)[0], fp8_bytes);
          timer.report("dispatch bf16" + shape, dispatch_timed(Format::kBf16, false)[0], bf16_bytes);
          const std::vector<float> split = dispatch_timed(Format::kFp8, true);
          timer.report("dispatch fp8 hook: send" + shape, split[0], 0);
          timer.report("dispatch fp8 hook: recv" + shape, split[1], 0);

          // Combine with the handle of one dispatch (kept out of the arena).
          Case dc = cc;
          LowLatencyDispatchInputs di;
          di.x = v.x;
          di.topk_idx = v.topk;
          di.num_max_dispatch_tokens_per_rank = cc.max_tokens;
          di.num_experts = cc.experts;
          LowLatencyOptions dopt;
          dopt.stream = stream;
          LowLatencyDispatchResult d = buffer.low_latency_dispatch(di, dopt);
          const std::vector<float> cmb = timer.run(1, [&] {
            cuda_check(cudaEventRecord(timer.event(0), stream), "cudaEventRecord");
            combine_call(dc, v, d.handle, false);
            cuda_check(cudaEventRecord(timer.event(1), stream), "cudaEventRecord");
          });
          timer.report("combine bf16" + shape, cmb[0], bf16_bytes);
          const std::vector<float> csplit = timer.run(2, [&] {
            cuda_check(cudaEventRecord(timer.event(0), stream), "cudaEventRecord");
            LowLatencyCombineResult r = combine_call(dc, v, d.handle, true);
            cuda_check(cudaEventRecord(timer.event(1), stream), "cudaEventRecord");
            r.hook(stream);
            cuda_check(cudaEventRecord(timer.event(2), stream), "cudaEventRecord");
          });
          timer.report("combine hook: send" + shape, csplit[0], 0);
          timer.report("combine hook: recv" + shape, csplit[1], 0);
          const std::vector<float> both = timer.run(2, [&] {
            arena.reset();
            cuda_check(cudaEventRecord(timer.event(0), stream), "cudaEventRecord");
            LowLatencyDispatchResult dd = dispatch(side, v, cc);
            cuda_check(cudaEventRecord(timer.event(1), stream), "cudaEventRecord");
            combine_call(dc, v, dd.handle, false);
            cuda_check(cudaEventRecord(timer.event(2), stream), "cudaEventRecord");
          });
          timer.report("dispatch fp8 + combine" + shape, both[0] + both[1], 0);
        }
        cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        buffer.destroy();
        cudaStreamDestroy(stream);
      },
      options);
}

}  // namespace
}  // namespace epcomm::testing::ll
