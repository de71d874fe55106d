// Low-latency mode on GPUs (SPEC §4) against the CPU reference backend, bit for bit: the case
// matrix, repeated runs, call orders with and without receive hooks, CUDA graph replay, buffer
// re-creation and the buffer's memory at the benchmark shape.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/layouts.hpp"  // kLowLatencyControlBytes
#include "ll_support.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::ll {
namespace {

RunRanksOptions long_run() {
  RunRanksOptions options;
  options.timeout = std::chrono::seconds(900);
  return options;
}

int largest_rank_count() {
  const std::vector<int> counts = rank_counts();
  return counts.empty() ? 0 : counts.back();
}

// Every value the task lists for T, hidden, K and the formats appears at least once; shapes change
// from case to case on the same buffers.
std::vector<Case> case_matrix(int R) {
  Case base;  // the benchmark shape: T_max = T = 128, hidden 7168, top-8 of 32 experts per rank, FP8
  base.experts = 32 * R;
  std::vector<Case> cases = {base};
  auto add = [&](auto edit) {
    Case c = base;
    edit(c);
    cases.push_back(c);
  };
  add([](Case& c) { c.format = Format::kBf16, c.hook = true; });
  add([](Case& c) { c.tokens = 1, c.format = Format::kFp8RoundScale; });
  add([](Case& c) {
    c.max_tokens = 256, c.tokens = 256, c.hidden = 4096, c.topk = 6, c.format = Format::kFp8Ue8m0, c.stats = true;
    c.int32_index = true;
  });
  add([R](Case& c) {
    c.max_tokens = 32, c.tokens = 17, c.hidden = 2048, c.topk = 9, c.experts = 9 * R, c.format = Format::kBf16;
    c.routing = Routing::kGapsAndRepeats, c.out = true, c.zero_copy = true;
  });
  add([](Case& c) { c.hidden = 8192, c.format = Format::kFp8Ue8m0, c.routing = Routing::kOneExpert, c.hook = true; });
  add([R](Case& c) {
    c.max_tokens = 17, c.tokens = 17, c.hidden = 2048, c.topk = 1, c.experts = R, c.routing = Routing::kGapsAndRepeats;
    c.stats = true;
  });
  add([](Case& c) {
    c.max_tokens = 256, c.tokens = 200, c.format = Format::kBf16, c.zero_copy = true, c.hook = true;
    c.routing = Routing::kGapsAndRepeats;
  });
  add([](Case& c) {
    c.topk = 9, c.hidden = 4096, c.routing = Routing::kOneExpert, c.format = Format::kBf16, c.stats = true;
  });
  add([](Case& c) { c.tokens = 0; });
  add([](Case& c) { c.ragged = true, c.tokens = 20, c.format = Format::kFp8RoundScale, c.hook = true, c.out = true; });
  return cases;
}

class LowLatencyGpuMatrix : public ::testing::TestWithParam<int> {};

TEST_P(LowLatencyGpuMatrix, DispatchAndCombineMatchTheCpuReference) {
  const int R = GetParam();
  if (!rank_count_runs_here(R)) GTEST_SKIP() << R << " ranks need " << R << " GPUs (or EPCOMM_TEST_MAX_RANKS)";
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const std::vector<Case> cases = case_matrix(R);
        Buffers b = make_buffers(group, cases);
        uint64_t seed = 100;
        for (const Case& c : cases) check_case(b, c, group.rank(), R, seed++);
        b.destroy();
      },
      long_run());
}

INSTANTIATE_TEST_SUITE_P(Ranks, LowLatencyGpuMatrix, ::testing::Values(2, 3, 4, 8),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::to_string(info.param) + "ranks";
                         });

TEST(LowLatencyGpu, HundredRepeatedRunsAreBitIdentical) {
  const int R = largest_rank_count();
  if (R == 0) GTEST_SKIP() << "needs 2 GPUs";
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int rank = group.rank();
        Case c;
        c.experts = 32 * R;
        Buffers b = make_buffers(group, {c});
        check_case(b, c, rank, R, 7);
        Inputs in = make_inputs(c, rank, R, 7);
        Views dv = device_views(in, c, b.stream);
        const Side gpu = gpu_side(b);
        DispatchOut first;
        std::vector<uint16_t> first_combined;
        std::optional<ExpertOutputs> experts;
        for (int run = 0; run < 100; ++run) {
          LowLatencyDispatchResult d = dispatch(gpu, dv, c);
          finish(gpu, d.hook);
          DispatchOut out = read_dispatch(d, c, R);
          if (!experts) experts = make_expert_outputs(c, R, out.recv_count, rank, 7);
          std::vector<DeviceMemory> keep;
          LowLatencyCombineResult cmb = combine(gpu, dv, c, d.handle, *experts, keep);
          finish(gpu, cmb.hook);
          std::vector<uint16_t> combined = read_bf16(cmb.combined_x);
          if (run == 0) {
            first = std::move(out);
            first_combined = std::move(combined);
            continue;
          }
          const std::string what = "rank " + std::to_string(rank) + " run " + std::to_string(run);
          expect_same_dispatch(first, out, what + " dispatch");
          expect_same_bf16(first_combined, combined, c.hidden, what + " combine");
        }
        b.destroy();
      },
      long_run());
}

// One micro-batch of the call-order test, on one side.
struct Batch {
  Case c;
  Inputs in;
  Views views;
  LowLatencyDispatchResult d;
  LowLatencyCombineResult cmb;
  std::vector<DeviceMemory> keep;
};

// Runs `order` on one side. Steps: "dN" dispatch (send, and receive unless hooked), "hN" the
// dispatch hook, "cN" combine, "kN" the combine hook. Experts come from the CPU's counts.
void run_order(const Side& side, const std::string& order, std::vector<Batch>& batches,
               const std::vector<ExpertOutputs>& experts) {
  for (size_t i = 0; i + 1 < order.size(); i += 3) {
    Batch& batch = batches[order[i + 1] - '1'];
    switch (order[i]) {
      case 'd':
        batch.d = dispatch(side, batch.views, batch.c);
        break;
      case 'h':
        batch.d.hook(side.stream);
        break;
      case 'c':
        batch.cmb = combine(side, batch.views, batch.c, batch.d.handle, experts[order[i + 1] - '1'], batch.keep);
        break;
      case 'k':
        batch.cmb.hook(side.stream);
        break;
    }
  }
  if (side.cuda) cuda_check(cudaStreamSynchronize(side.stream), "cudaStreamSynchronize");
}

TEST(LowLatencyGpu, CallOrdersWithAndWithoutHooksMatchTheCpuReference) {
  const int R = largest_rank_count();
  if (R == 0) GTEST_SKIP() << "needs 2 GPUs";
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int rank = group.rank();
        Case first, second;  // same buffer shape (interleaved calls keep one shape), different data
        first.experts = second.experts = 32 * R;
        second.tokens = 64, second.format = Format::kBf16, second.routing = Routing::kGapsAndRepeats;
        Buffers b = make_buffers(group, {first});
        const std::vector<std::pair<std::string, bool>> orders = {
            {"d1 c1 d2 c2", false},
            {"d1 d2 c1 c2", false},
            {"d1 d2 h1 h2 c1 c2 k1 k2", true},
            {"d1 d2 h2 h1 c2 c1 k1 k2", true},
        };
        uint64_t seed = 300;
        for (const auto& [order, hooks] : orders) {
          std::vector<Batch> cpu(2), gpu(2);
          for (int i = 0; i < 2; ++i) {
            Case c = i == 0 ? first : second;
            c.hook = hooks;
            cpu[i].c = gpu[i].c = c;
            cpu[i].in = make_inputs(c, rank, R, seed + i);
            gpu[i].in = cpu[i].in;
            cpu[i].views = host_views(cpu[i].in, c);
            gpu[i].views = device_views(gpu[i].in, c, b.stream);
          }
          // The CPU side goes first; its counts give the experts' outputs for both sides.
          std::vector<ExpertOutputs> experts(2);
          std::string dispatch_only;
          for (size_t i = 0; i + 1 < order.size(); i += 3)
            if (order[i] == 'd' || order[i] == 'h') dispatch_only += order.substr(i, 3);
          run_order(cpu_side(b), dispatch_only, cpu, experts);
          for (int i = 0; i < 2; ++i)
            experts[i] =
                make_expert_outputs(cpu[i].c, R, read_dispatch(cpu[i].d, cpu[i].c, R).recv_count, rank, seed + i);
          std::string combine_only;
          for (size_t i = 0; i + 1 < order.size(); i += 3)
            if (order[i] == 'c' || order[i] == 'k') combine_only += order.substr(i, 3);
          run_order(cpu_side(b), combine_only, cpu, experts);
          run_order(gpu_side(b), order + " ", gpu, experts);
          for (int i = 0; i < 2; ++i) {
            const std::string what =
                "rank " + std::to_string(rank) + " order '" + order + "' batch " + std::to_string(i + 1);
            expect_same_dispatch(read_dispatch(cpu[i].d, cpu[i].c, R), read_dispatch(gpu[i].d, gpu[i].c, R),
                                 what + " dispatch");
            expect_same_bf16(read_bf16(cpu[i].cmb.combined_x), read_bf16(gpu[i].cmb.combined_x), cpu[i].c.hidden,
                             what + " combine");
          }
          seed += 2;
        }
        b.destroy();
      },
      long_run());
}

// dispatch -> fake expert -> combine captured once, replayed with new tokens and new routing.
TEST(LowLatencyGpu, CudaGraphReplaysWithNewInputsAndRouting) {
  const int R = largest_rank_count();
  if (R == 0) GTEST_SKIP() << "needs 2 GPUs";
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int rank = group.rank();
        Case c;
        c.experts = 32 * R, c.hidden = 4096, c.format = Format::kBf16;
        const int L = c.experts / R;
        const int64_t N = int64_t(R) * c.max_tokens;
        Buffers b = make_buffers(group, {c});
        const Device gpu_device = Device::cuda(b.device);
        // Inputs live at fixed addresses; each replay copies new values in first.
        Inputs in = make_inputs(c, rank, R, 500);
        DeviceMemory x = DeviceMemory::allocate(in.x.size() * 2), topk = DeviceMemory::allocate(in.topk.size() * 8),
                     weights = DeviceMemory::allocate(in.weights.size() * 4),
                     expert_out = DeviceMemory::allocate(size_t(L) * N * c.hidden * 2);
        Views dv;
        dv.tokens = c.tokens;
        dv.x = TensorView::contiguous(x.get(), DType::kBFloat16, {c.tokens, c.hidden}, gpu_device);
        dv.topk = TensorView::contiguous(topk.get(), DType::kInt64, {c.tokens, c.topk}, gpu_device);
        dv.weights = TensorView::contiguous(weights.get(), DType::kFloat32, {c.tokens, c.topk}, gpu_device);
        ArenaAllocator arena(size_t(640) << 20);  // recv_x alone is 256 MiB at R = 8
        Side gpu = gpu_side(b);
        gpu.allocator = &arena;

        cudaGraph_t graph = nullptr;
        cuda_check(cudaStreamBeginCapture(b.stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
        LowLatencyDispatchResult d = dispatch(gpu, dv, c);
        launch_fake_expert(d.recv_x.data_as<uint16_t>(), static_cast<uint16_t*>(expert_out.get()),
                           d.recv_count.data_as<int32_t>(), L, N, c.hidden, b.stream);
        LowLatencyCombineInputs ci;
        ci.x = TensorView::contiguous(expert_out.get(), DType::kBFloat16, {L, N, int64_t(c.hidden)}, gpu_device);
        ci.topk_idx = dv.topk;
        ci.topk_weights = dv.weights;
        ci.handle = &d.handle;
        LowLatencyOptions co;
        co.stream = b.stream;
        co.allocator = &arena;
        LowLatencyCombineResult cmb = b.gpu->low_latency_combine(ci, co);
        cuda_check(cudaStreamEndCapture(b.stream, &graph), "cudaStreamEndCapture");
        cudaGraphExec_t exec = nullptr;
        cuda_check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");

        for (int replay = 0; replay < 5; ++replay) {
          in = make_inputs(c, rank, R, 600 + replay);
          cuda_check(cudaMemcpy(x.get(), in.x.data(), in.x.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
          cuda_check(cudaMemcpy(topk.get(), in.topk.data(), in.topk.size() * 8, cudaMemcpyHostToDevice), "cudaMemcpy");
          cuda_check(cudaMemcpy(weights.get(), in.weights.data(), in.weights.size() * 4, cudaMemcpyHostToDevice),
                     "cudaMemcpy");
          cuda_check(cudaGraphLaunch(exec, b.stream), "cudaGraphLaunch");
          cuda_check(cudaStreamSynchronize(b.stream), "cudaStreamSynchronize");

          Views hv = host_views(in, c);
          LowLatencyDispatchResult expected = dispatch(cpu_side(b), hv, c);
          finish(cpu_side(b), expected.hook);
          const DispatchOut expected_out = read_dispatch(expected, c, R);
          const std::string what = "rank " + std::to_string(rank) + " replay " + std::to_string(replay);
          expect_same_dispatch(expected_out, read_dispatch(d, c, R), what + " dispatch");
          std::vector<DeviceMemory> keep;
          LowLatencyCombineResult expected_c =
              combine(cpu_side(b), hv, c, expected.handle, fake_expert_outputs(expected_out, c, R), keep);
          finish(cpu_side(b), expected_c.hook);
          expect_same_bf16(read_bf16(expected_c.combined_x), read_bf16(cmb.combined_x), c.hidden, what + " combine");
        }
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        b.destroy();
      },
      long_run());
}

TEST(LowLatencyGpu, ABufferCanBeCreatedAgainInTheSameProcess) {
  const int R = largest_rank_count();
  if (R == 0) GTEST_SKIP() << "needs 2 GPUs";
  run_ranks(
      R,
      [R](Bootstrap& group) {
        Case c;
        c.experts = 32 * R, c.tokens = 33;
        for (int round = 0; round < 3; ++round) {
          Buffers b = make_buffers(group, {c});
          check_case(b, c, group.rank(), R, 700 + round);
          b.destroy();
        }
      },
      long_run());
}

// GPU memory in use on the device with PCI bus id `bus_id`, as NVML sees it (all processes), or -1
// when NVML is not there. NVML is opened at run time so that the tests build without it; it reads
// the device without creating a CUDA context, which is what lets the context be measured.
int64_t nvml_used_bytes(const char* bus_id) {
  using Init = int (*)();
  using HandleByBusId = int (*)(const char*, void**);
  struct Memory {
    unsigned long long total, free, used;
  };
  using MemoryInfo = int (*)(void*, Memory*);
  static void* library = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) return -1;
  static const bool ready = [] {
    auto init = reinterpret_cast<Init>(dlsym(library, "nvmlInit_v2"));
    return init != nullptr && init() == 0;
  }();
  auto by_bus_id = reinterpret_cast<HandleByBusId>(dlsym(library, "nvmlDeviceGetHandleByPciBusId_v2"));
  auto memory_info = reinterpret_cast<MemoryInfo>(dlsym(library, "nvmlDeviceGetMemoryInfo"));
  void* device = nullptr;
  Memory memory = {};
  if (!ready || by_bus_id == nullptr || memory_info == nullptr || by_bus_id(bus_id, &device) != 0 ||
      memory_info(device, &memory) != 0)
    return -1;
  return static_cast<int64_t>(memory.used);
}

int64_t free_device_bytes() {
  size_t free = 0, total = 0;
  cuda_check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return static_cast<int64_t>(free);
}

double megabytes(int64_t bytes) { return double(bytes) / 1e6; }

// Informational: what the size hint returns and what a CUDA Buffer takes at the benchmark shape,
// in three parts: the CUDA context (NVML, before and after the context exists), NVSHMEM's start-up
// (a first Buffer with only the control region: NVSHMEM init, its heap's first chunk, its own
// buffers) and epcomm's symmetric buffer (a second Buffer of the hint's size: how much the heap
// grows for it). NVSHMEM_SYMMETRIC_SIZE is set here when unset so that the second Buffer fits in
// either heap kind (it only sizes NVSHMEM's static heap, used when CUDA VMM is off).
TEST(LowLatencyGpu, BufferMemoryAtTheBenchmarkShape) {
  const int R = largest_rank_count();
  if (R == 0) GTEST_SKIP() << "needs 2 GPUs";
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int E = R == 8 ? 256 : 32 * R;
        const int64_t hint = low_latency_buffer_size_hint(128, 7168, R, E);
        const int device = group.rank() % visible_gpus();
        char bus_id[32] = {};
        cuda_check(cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), device), "cudaDeviceGetPCIBusId");
        const int64_t used_before_context = nvml_used_bytes(bus_id);
        cuda_check(cudaSetDevice(device), "cudaSetDevice");
        cuda_check(cudaFree(nullptr), "cudaFree");  // create the context before measuring
        const int64_t used_with_context = nvml_used_bytes(bus_id);
        if (std::getenv("NVSHMEM_SYMMETRIC_SIZE") == nullptr)
          setenv("NVSHMEM_SYMMETRIC_SIZE", std::to_string(hint + (int64_t(64) << 20)).c_str(), 1);

        BufferOptions options;
        options.backend = BackendKind::kCuda;
        options.low_latency_mode = true;
        options.device = device;
        const int64_t free_before = free_device_bytes();
        options.num_rdma_bytes = kLowLatencyControlBytes;
        Buffer first(group, options);
        const int64_t free_after_first = free_device_bytes();
        options.num_rdma_bytes = hint;
        Buffer second(group, options);
        const int64_t free_after_second = free_device_bytes();

        const auto env = [](const char* name) {
          const char* value = std::getenv(name);
          return std::string(value ? value : "(unset)");
        };
        if (group.rank() == 0) {
          char context[64] = "n/a (no NVML)";
          if (used_before_context >= 0 && used_with_context >= 0)
            std::snprintf(context, sizeof(context), "%.1f MB", megabytes(used_with_context - used_before_context));
          std::printf(
              "[ll-memory] R=%d T_max=128 hidden=7168 E=%d: hint %.1f MB; CUDA context %s; NVSHMEM start-up "
              "(Buffer of %.1f MB) %.1f MB; symmetric buffer (second Buffer of the hint's size) %.1f MB; both "
              "Buffers %.1f MB [NVSHMEM_DISABLE_NCCL=%s NVSHMEM_CUMEM_GRANULARITY=%s "
              "NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=%s]\n",
              R, E, megabytes(hint), context, megabytes(kLowLatencyControlBytes),
              megabytes(free_before - free_after_first), megabytes(free_after_first - free_after_second),
              megabytes(free_before - free_after_second), env("NVSHMEM_DISABLE_NCCL").c_str(),
              env("NVSHMEM_CUMEM_GRANULARITY").c_str(), env("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY").c_str());
        }
        if (R == 8) {
          EXPECT_LE(hint, int64_t(500'000'000)) << "goal: at most 0.5 GB at the benchmark shape";
        }
        second.destroy();
        first.destroy();
      },
      [] {
        RunRanksOptions o;
        o.timeout = std::chrono::seconds(300);
        o.print_output_on_success = true;
        return o;
      }());
}

}  // namespace
}  // namespace epcomm::testing::ll
