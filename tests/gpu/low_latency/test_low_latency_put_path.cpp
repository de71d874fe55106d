// Low-latency mode over the NVSHMEM put path (SPEC §4.2b), on one host: with emulated nodes
// (ranks_per_node G < R) a rank sends to the ranks of other nodes with nvshmemx_putmem_nbi, quiet
// and nvshmemx_signal_op instead of NVLink stores (LowLatencyPutPath::kAuto), or to every rank,
// itself included (kAll). Every output must match the CPU reference bit for bit, as on the store
// path: recv_x, scales, recv_count, src_info, layout_range and combined_x.
//
// On these hosts NVSHMEM's remote transports cannot run (UCX atomics abort without GDRCopy), so
// the puts travel over NVLink inside NVSHMEM (its P2P transport): the calls, the staging copies,
// the quiet and the signals are the put path's, the wire is not. Ranks may share one GPU
// ($EPCOMM_TEST_SHARE_GPUS=1, see ll_support.hpp rank_count_runs_here).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ll_support.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::ll {
namespace {

RunRanksOptions long_run() {
  RunRanksOptions options;
  options.timeout = std::chrono::seconds(900);
  return options;
}

const char* path_name(LowLatencyPutPath path) {
  switch (path) {
    case LowLatencyPutPath::kAuto:
      return "auto";
    case LowLatencyPutPath::kMapped:
      return "mapped";
    case LowLatencyPutPath::kAll:
      return "all";
  }
  return "?";
}

struct PutConfig {
  int ranks = 2;           // R
  int ranks_per_node = 1;  // G
  LowLatencyPutPath path = LowLatencyPutPath::kAuto;
  std::string name() const {
    std::ostringstream s;  // (not operator+ on strings: GCC 12 warns falsely about it, -Wrestrict)
    s << "R" << ranks << "_G" << ranks_per_node << "_" << path_name(path);
    return s.str();
  }
  // Whether this configuration makes `rank` reach `peer` with puts.
  bool puts(int rank, int peer) const {
    return path == LowLatencyPutPath::kAll || rank / ranks_per_node != peer / ranks_per_node;
  }
};

// gtest prints the parameter of a failing test with this.
void PrintTo(const PutConfig& config, std::ostream* os) { *os << config.name(); }

// R = 2, 4 (G = 1, 2) and 8 (G = 2, 4) with the other nodes' peers on puts, and with every peer
// on puts.
std::vector<PutConfig> configs() {
  using P = LowLatencyPutPath;
  return {{2, 1, P::kAuto}, {2, 2, P::kAll},  {4, 1, P::kAuto}, {4, 2, P::kAuto},
          {4, 2, P::kAll},  {8, 2, P::kAuto}, {8, 4, P::kAuto}, {8, 4, P::kAll}};
}

// FP8 (three scale formats) and BF16, with and without hook, zero-copy and not, gaps and repeats,
// ragged T (T = 0 on the last ranks), T = 0 everywhere.
std::vector<Case> put_cases(int R) {
  Case base;  // the benchmark shape: T_max = T = 128, hidden 7168, top-8 of 32 experts per rank, FP8
  base.experts = 32 * R;
  std::vector<Case> cases = {base};
  auto add = [&](auto edit) {
    Case c = base;
    edit(c);
    cases.push_back(c);
  };
  add([](Case& c) { c.format = Format::kBf16, c.hook = true; });
  add([](Case& c) {
    c.max_tokens = 64, c.tokens = 64, c.hidden = 4096, c.topk = 6, c.format = Format::kFp8Ue8m0, c.hook = true;
    c.routing = Routing::kGapsAndRepeats, c.int32_index = true, c.stats = true;
  });
  add([R](Case& c) {
    c.max_tokens = 32, c.tokens = 17, c.hidden = 2048, c.topk = 9, c.experts = 9 * R, c.format = Format::kBf16;
    c.routing = Routing::kGapsAndRepeats, c.out = true, c.zero_copy = true;
  });
  add([](Case& c) {
    c.max_tokens = 32, c.tokens = 20, c.hidden = 2048, c.ragged = true, c.format = Format::kFp8RoundScale;
    c.zero_copy = true, c.hook = true;
  });
  add([](Case& c) { c.hidden = 8192, c.format = Format::kFp8, c.routing = Routing::kOneExpert; });
  add([](Case& c) { c.tokens = 0, c.format = Format::kBf16, c.hook = true; });
  return cases;
}

// The shape of the zero-copy interleaving check below (bf16, one buffer shape for both calls).
Case interleave_case(int R) {
  Case c;
  c.max_tokens = 64, c.tokens = 48, c.hidden = 2048, c.topk = 8, c.experts = 8 * R, c.format = Format::kBf16;
  return c;
}

// Without this the comparison below could pass on the store path alone.
void expect_put_peers(Buffer& gpu, const PutConfig& config, int rank) {
  const std::vector<bool> puts = gpu.low_latency_put_peers();
  ASSERT_EQ(static_cast<int>(puts.size()), config.ranks);
  for (int r = 0; r < config.ranks; ++r) {
    if (config.puts(rank, r)) {
      EXPECT_TRUE(puts[r]) << "rank " << rank << " (" << config.name() << "): peer " << r
                           << " must be reached with NVSHMEM puts, but the peer table maps it (stores)";
    } else if (puts[r]) {
      std::printf("[put-path] rank %d (%s): peer %d of the same node is not mapped by NVSHMEM: puts too\n", rank,
                  config.name().c_str(), r);
    }
  }
}

// A combine that is not zero-copy must leave alone the zero-copy buffer the caller already filled
// for the next combine: dispatch 1 and 2, fill the zero-copy buffer with the experts' rows of 2,
// combine 1 from a tensor of its own (put peers get staged copies), then combine 2 zero-copy.
bool check_zero_copy_after_plain_combine(Buffers& b, int rank, int num_ranks, uint64_t seed) {
  const std::string what = "rank " + std::to_string(rank) + " [zero-copy combine after a plain one]";
  Case first = interleave_case(num_ranks), second = first;
  second.routing = Routing::kGapsAndRepeats;
  Inputs in1 = make_inputs(first, rank, num_ranks, seed), in2 = make_inputs(second, rank, num_ranks, seed + 1);
  Views hv1 = host_views(in1, first), hv2 = host_views(in2, second);
  Views dv1 = device_views(in1, first, b.stream), dv2 = device_views(in2, second, b.stream);
  const Side cpu = cpu_side(b), gpu = gpu_side(b);

  LowLatencyDispatchResult cpu1 = dispatch(cpu, hv1, first), cpu2 = dispatch(cpu, hv2, second);
  LowLatencyDispatchResult gpu1 = dispatch(gpu, dv1, first);
  finish(gpu, gpu1.hook);
  LowLatencyDispatchResult gpu2 = dispatch(gpu, dv2, second);
  finish(gpu, gpu2.hook);
  const ExpertOutputs experts1 =
      make_expert_outputs(first, num_ranks, read_dispatch(cpu1, first, num_ranks).recv_count, rank, seed);
  const ExpertOutputs experts2 =
      make_expert_outputs(second, num_ranks, read_dispatch(cpu2, second, num_ranks).recv_count, rank, seed + 1);

  std::vector<DeviceMemory> keep;
  LowLatencyCombineResult expected1 = combine(cpu, hv1, first, cpu1.handle, experts1, keep);
  LowLatencyCombineResult expected2 = combine(cpu, hv2, second, cpu2.handle, experts2, keep);

  const TensorView zero_copy = b.gpu->next_low_latency_combine_buffer(gpu2.handle);
  experts2.copy_to_device(zero_copy.data, b.stream);
  LowLatencyCombineResult actual1 = combine(gpu, dv1, first, gpu1.handle, experts1, keep);
  finish(gpu, actual1.hook);
  LowLatencyCombineInputs in;
  in.x = zero_copy;
  in.zero_copy = true;
  in.topk_idx = dv2.topk;
  in.topk_weights = dv2.weights;
  in.handle = &gpu2.handle;
  LowLatencyOptions options;
  options.stream = b.stream;
  options.allocator = gpu.allocator;
  LowLatencyCombineResult actual2 = b.gpu->low_latency_combine(in, options);
  finish(gpu, actual2.hook);

  bool same = expect_same_bf16(read_bf16(expected1.combined_x), read_bf16(actual1.combined_x), first.hidden,
                               what + " combine 1 (plain)");
  same &= expect_same_bf16(read_bf16(expected2.combined_x), read_bf16(actual2.combined_x), second.hidden,
                           what + " combine 2 (zero-copy)");
  return same;
}

// Two calls in flight with hooks, receive halves out of order: d1 d2 h2 h1, c1 c2 k1 k2 (FP8 and
// bf16). Both parities' staging and receive regions are in use at once.
struct TwoCalls {
  Case cases[2];
  Inputs inputs[2];
  Views views[2];
  LowLatencyDispatchResult dispatched[2];
  LowLatencyCombineResult combined[2];
};

void dispatch_two(const Side& side, TwoCalls& calls) {
  for (int i = 0; i < 2; ++i) calls.dispatched[i] = dispatch(side, calls.views[i], calls.cases[i]);
  for (int i : {1, 0}) calls.dispatched[i].hook(side.stream);
  if (side.cuda) cuda_check(cudaStreamSynchronize(side.stream), "cudaStreamSynchronize");
}

void combine_two(const Side& side, TwoCalls& calls, const ExpertOutputs (&experts)[2],
                 std::vector<DeviceMemory>& keep) {
  for (int i = 0; i < 2; ++i)
    calls.combined[i] = combine(side, calls.views[i], calls.cases[i], calls.dispatched[i].handle, experts[i], keep);
  for (int i : {0, 1}) calls.combined[i].hook(side.stream);
  if (side.cuda) cuda_check(cudaStreamSynchronize(side.stream), "cudaStreamSynchronize");
}

bool check_interleaved_hooks(Buffers& b, int rank, int num_ranks, uint64_t seed) {
  TwoCalls cpu, gpu;
  Case first = interleave_case(num_ranks);
  first.hook = true, first.format = Format::kFp8;
  Case second = first;
  second.tokens = 33, second.format = Format::kBf16, second.routing = Routing::kGapsAndRepeats;
  for (int i = 0; i < 2; ++i) {
    cpu.cases[i] = gpu.cases[i] = i == 0 ? first : second;
    cpu.inputs[i] = make_inputs(cpu.cases[i], rank, num_ranks, seed + i);
    gpu.inputs[i] = cpu.inputs[i];
    cpu.views[i] = host_views(cpu.inputs[i], cpu.cases[i]);
    gpu.views[i] = device_views(gpu.inputs[i], gpu.cases[i], b.stream);
  }
  dispatch_two(cpu_side(b), cpu);
  dispatch_two(gpu_side(b), gpu);
  bool same = true;
  ExpertOutputs experts[2];
  for (int i = 0; i < 2; ++i) {
    const std::string what = "rank " + std::to_string(rank) + " [two calls with hooks, call " + std::to_string(i + 1) +
                             ": " + cpu.cases[i].name() + "]";
    const DispatchOut expected = read_dispatch(cpu.dispatched[i], cpu.cases[i], num_ranks);
    same &=
        expect_same_dispatch(expected, read_dispatch(gpu.dispatched[i], gpu.cases[i], num_ranks), what + " dispatch");
    experts[i] = make_expert_outputs(cpu.cases[i], num_ranks, expected.recv_count, rank, seed + i);
  }
  std::vector<DeviceMemory> keep;
  combine_two(cpu_side(b), cpu, experts, keep);
  combine_two(gpu_side(b), gpu, experts, keep);
  for (int i = 0; i < 2; ++i)
    same &= expect_same_bf16(
        read_bf16(cpu.combined[i].combined_x), read_bf16(gpu.combined[i].combined_x), cpu.cases[i].hidden,
        "rank " + std::to_string(rank) + " [two calls with hooks, call " + std::to_string(i + 1) + "] combine");
  return same;
}

class LowLatencyPutPathGpu : public ::testing::TestWithParam<PutConfig> {};

TEST_P(LowLatencyPutPathGpu, EveryOutputMatchesTheCpuReference) {
  const PutConfig config = GetParam();
  if (!rank_count_runs_here(config.ranks))
    GTEST_SKIP() << config.ranks << " ranks need " << config.ranks
                 << " GPUs (or EPCOMM_TEST_SHARE_GPUS=1; EPCOMM_TEST_MAX_RANKS)";
  run_ranks(
      config.ranks,
      [config](Bootstrap& group) {
        SCOPED_TRACE("put path " + config.name());
        const int rank = group.rank(), R = config.ranks;
        std::vector<Case> cases = put_cases(R);
        std::vector<Case> sizing = cases;
        sizing.push_back(interleave_case(R));
        // The CPU reference gets the same ranks_per_node (its low-latency results do not depend on it).
        Buffers b = make_buffers(group, sizing, false, std::chrono::milliseconds(0), [&](BufferOptions& o) {
          o.ranks_per_node = config.ranks_per_node;
          o.low_latency_put_path = config.path;
        });
        EXPECT_EQ(b.gpu->ranks_per_node(), config.ranks_per_node);
        expect_put_peers(*b.gpu, config, rank);
        uint64_t seed = 900;
        for (const Case& c : cases) check_case(b, c, rank, R, seed++);
        check_zero_copy_after_plain_combine(b, rank, R, seed);
        check_interleaved_hooks(b, rank, R, seed + 2);
        b.destroy();
      },
      long_run());
}

INSTANTIATE_TEST_SUITE_P(Configs, LowLatencyPutPathGpu, ::testing::ValuesIn(configs()),
                         [](const ::testing::TestParamInfo<PutConfig>& info) { return info.param.name(); });

// A CUDA Buffer of low-latency mode on its own (no CPU reference), on GPU rank % count.
std::unique_ptr<Buffer> gpu_buffer(Bootstrap& group, const std::function<void(BufferOptions&)>& edit) {
  const int gpus = visible_gpus();
  if (gpus == 0) throw std::runtime_error("no CUDA device");
  cuda_check(cudaSetDevice(group.rank() % gpus), "cudaSetDevice");
  BufferOptions options;
  options.backend = BackendKind::kCuda;
  options.device = group.rank() % gpus;
  options.low_latency_mode = true;
  options.num_rdma_bytes = low_latency_buffer_size_hint(32, 2048, group.size(), 8 * group.size());
  edit(options);
  return std::make_unique<Buffer>(group, options);
}

// Which peers the buffer reaches with puts (its peer table's zero entries).
std::vector<bool> put_peers(Buffer& gpu, int num_ranks) {
  std::vector<bool> puts = gpu.low_latency_put_peers();
  EXPECT_EQ(static_cast<int>(puts.size()), num_ranks);
  return puts;
}

// $EPCOMM_LL_PUT_PATH refines kAuto; allow_nvlink_for_low_latency_mode = false means every peer on
// puts; kMapped (and the default on one node) keeps stores to every peer NVSHMEM maps. What NVSHMEM
// maps is read from a kMapped buffer first (ranks sharing one GPU may not be mapped).
TEST(LowLatencyPutPathGpuOptions, EnvironmentAndDeepEpSwitchSelectThePath) {
  if (!rank_count_runs_here(2)) GTEST_SKIP() << "needs 2 GPUs (or EPCOMM_TEST_SHARE_GPUS=1)";
  run_ranks(2, [](Bootstrap& group) {
    const int R = group.size();
    const std::vector<bool> everyone(R, true);
    std::vector<bool> unmapped;
    {
      auto buffer = gpu_buffer(group, [](BufferOptions& o) {
        o.ranks_per_node = 1;
        o.low_latency_put_path = LowLatencyPutPath::kMapped;
      });
      unmapped = put_peers(*buffer, R);
      for (int r = 0; r < R; ++r)
        if (unmapped[r]) std::printf("[put-path] rank %d: NVSHMEM does not map peer %d\n", group.rank(), r);
      EXPECT_FALSE(unmapped[group.rank()]) << "a rank's own memory is always mapped";
      buffer->destroy();
    }
    {
      auto buffer = gpu_buffer(group, [](BufferOptions&) {});
      EXPECT_EQ(put_peers(*buffer, R), unmapped) << "default on one node: puts only where NVSHMEM maps nothing";
      buffer->destroy();
    }
    {
      auto buffer = gpu_buffer(group, [](BufferOptions& o) { o.ranks_per_node = 1; });
      std::vector<bool> expected(R, true);
      expected[group.rank()] = unmapped[group.rank()];
      EXPECT_EQ(put_peers(*buffer, R), expected) << "default with ranks_per_node = 1: every other rank on puts";
      buffer->destroy();
    }
    {
      setenv("EPCOMM_LL_PUT_PATH", "all", 1);
      auto buffer = gpu_buffer(group, [](BufferOptions&) {});
      EXPECT_EQ(put_peers(*buffer, R), everyone) << "EPCOMM_LL_PUT_PATH=all: every peer on puts";
      buffer->destroy();
      unsetenv("EPCOMM_LL_PUT_PATH");
    }
    {
      auto buffer = gpu_buffer(group, [](BufferOptions& o) { o.allow_nvlink_for_low_latency_mode = false; });
      EXPECT_EQ(put_peers(*buffer, R), everyone) << "allow_nvlink_for_low_latency_mode=false: every peer on puts";
      buffer->destroy();
    }
    setenv("EPCOMM_LL_PUT_PATH", "sometimes", 1);
    try {
      gpu_buffer(group, [](BufferOptions&) {});
      ADD_FAILURE() << "EPCOMM_LL_PUT_PATH=sometimes was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("EPCOMM_LL_PUT_PATH"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("sometimes"), std::string::npos) << e.what();
    }
    unsetenv("EPCOMM_LL_PUT_PATH");
  });
}

}  // namespace
}  // namespace epcomm::testing::ll
