// The CUDA-graph capturable paths of high-throughput mode (SPEC §3.2): a num_worst_tokens dispatch, and
// cached dispatch + combine, captured once and replayed with new input values (and new routing) must
// match the CPU reference run eagerly on the same values. Nothing host-side is frozen into the graph:
// the call counter lives on the device.
#include <gtest/gtest.h>

#include "normal_support.hpp"
#include "support/gpu.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::normal {
namespace {

constexpr int kReplays = 3;

std::string ranks_name(const ::testing::TestParamInfo<int>& info) { return "R" + std::to_string(info.param); }

class NormalModeGraphs : public ::testing::TestWithParam<int> {};

// A captured sequence and the stream it runs on.
struct Graph {
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~Graph() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (stream) cudaStreamDestroy(stream);
  }
};

// Combine inputs for a handle with `rows` rows: expert outputs in a fixed device buffer (rewritten
// before every replay) and the given received weights.
struct CombineFeed {
  std::vector<uint16_t> host;
  DeviceCopy device;
  TensorView view;
  CombineFeed(int rows, int hidden, uint64_t seed) : host(random_bf16(size_t(rows) * hidden, seed)) {
    device = DeviceCopy(host.data(), host.size() * 2);
    int index = 0;
    cudaGetDevice(&index);
    view = TensorView::contiguous(device.data(), DType::kBFloat16, {rows, hidden}, Device::cuda(index));
  }
  void refresh(uint64_t seed) {
    host = random_bf16(host.size(), seed);
    device.write(host.data(), host.size() * 2);
  }
  TensorView host_view() const {
    return TensorView::contiguous(const_cast<uint16_t*>(host.data()), DType::kBFloat16, {view.size(0), view.size(1)},
                                  Device::cpu());
  }
};

int64_t real_rows_of(const DispatchHandle& handle, int rank) {
  const std::vector<int32_t> prefix = values<int32_t>(handle.rank_prefix_matrix);
  return std::min<int64_t>(prefix[size_t(handle.num_ranks - 1) * handle.num_ranks + rank], handle.num_recv_tokens);
}

TEST_P(NormalModeGraphs, WorstCaseDispatchCombineAndCachedDispatchReplayWithNewValues) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = GetParam();
  Case c;
  c.name = "graph";
  c.num_bias = 1;
  c.num_worst_tokens = c.num_tokens * R;  // always enough
  run_ranks(R, [&](Bootstrap& group) {
    const int rank = group.rank();
    const int device = select_device(rank);
    Buffer cpu(group, cpu_options());
    Buffer gpu(group, gpu_options(R, int64_t(c.hidden) * 2, {c.config}, device));
    ArenaAllocator arena(device, size_t(64) << 20);
    PoisonAllocator poison;
    RankInputs inputs(c, rank, R);
    CombineFeed feed(c.num_worst_tokens, c.hidden, 7 + rank);
    const std::vector<uint16_t> bias_host = random_bf16(size_t(c.num_tokens) * c.hidden, 11 + rank);
    DeviceCopy bias_device(bias_host.data(), bias_host.size() * 2);
    const TensorView bias_gpu =
        TensorView::contiguous(bias_device.data(), DType::kBFloat16, {c.num_tokens, c.hidden}, Device::cuda(device));
    const TensorView bias_cpu = TensorView::contiguous(const_cast<uint16_t*>(bias_host.data()), DType::kBFloat16,
                                                       {c.num_tokens, c.hidden}, Device::cpu());

    // Capture: fresh dispatch (num_worst_tokens) -> combine (of the fed expert outputs) -> cached dispatch.
    Graph g;
    EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking));
    const StreamOptions on_graph{.stream = reinterpret_cast<StreamHandle>(g.stream), .allocator = &arena};
    EPCOMM_TEST_CUDA(cudaStreamBeginCapture(g.stream, cudaStreamCaptureModeGlobal));
    const DispatchInputs gpu_in = inputs.dispatch_inputs(true);
    const DispatchResult dispatched = gpu.dispatch(gpu_in, on_graph);
    CombineInputs combine;
    combine.x = feed.view;
    combine.handle = dispatched.handle.get();
    combine.topk_weights = dispatched.recv_topk_weights;
    combine.bias_0 = bias_gpu;
    combine.config = c.config;
    const CombineResult combined = gpu.combine(combine, on_graph);
    DispatchInputs cached_in;
    cached_in.x = gpu_in.x;
    cached_in.handle = dispatched.handle.get();
    cached_in.config = c.config;
    const DispatchResult cached = gpu.dispatch(cached_in, on_graph);
    EPCOMM_TEST_CUDA(cudaStreamEndCapture(g.stream, &g.graph));
    EPCOMM_TEST_CUDA(cudaGraphInstantiate(&g.exec, g.graph, 0));

    for (int replay = 0; replay < kReplays; ++replay) {
      SCOPED_TRACE("replay " + std::to_string(replay));
      inputs.refresh(100 + replay, /*reroute=*/true);
      feed.refresh(200 + replay * 10 + rank);
      arena.poison();
      EPCOMM_TEST_CUDA(cudaGraphLaunch(g.exec, g.stream));
      EPCOMM_TEST_CUDA(cudaStreamSynchronize(g.stream));
      ASSERT_NO_THROW(gpu.check_errors());

      // The reference, eagerly on the CPU with the same values.
      const DispatchResult ref = cpu.dispatch(inputs.dispatch_inputs(false), {.allocator = &poison});
      const int64_t real = real_rows_of(*ref.handle, rank);
      expect_same_rows("graph recv_x", ref.recv_x, dispatched.recv_x, real);
      expect_same_rows("graph recv_topk_idx", *ref.recv_topk_idx, *dispatched.recv_topk_idx);
      expect_same_rows("graph recv_topk_weights", *ref.recv_topk_weights, *dispatched.recv_topk_weights);
      expect_same_rows("graph rank_prefix_matrix", ref.handle->rank_prefix_matrix,
                       dispatched.handle->rank_prefix_matrix);
      expect_same_rows("graph send_row", ref.handle->send_row, dispatched.handle->send_row);
      CombineInputs ref_combine;
      ref_combine.x = feed.host_view();
      ref_combine.handle = ref.handle.get();
      ref_combine.topk_weights = *ref.recv_topk_weights;
      ref_combine.bias_0 = bias_cpu;
      ref_combine.config = c.config;
      const CombineResult ref_combined = cpu.combine(ref_combine, {.allocator = &poison});
      expect_same_rows("graph combined_x", ref_combined.combined_x, combined.combined_x);
      expect_same_rows("graph combined_topk_weights", *ref_combined.combined_topk_weights,
                       *combined.combined_topk_weights);
      expect_same_rows("graph cached recv_x", ref.recv_x, cached.recv_x, real);
      if (::testing::Test::HasFailure()) break;
    }
    gpu.destroy();
    cpu.destroy();
  });
}

TEST_P(NormalModeGraphs, CachedDispatchAndCombineReplayWithNewValues) {
  EPCOMM_REQUIRE_GPUS(1);
  const int R = GetParam();
  Case c;
  c.name = "graph cached";
  c.fp8 = true;
  c.scales_column_major = true;
  c.hidden = 512;
  run_ranks(R, [&](Bootstrap& group) {
    const int rank = group.rank();
    const int device = select_device(rank);
    Buffer cpu(group, cpu_options());
    Buffer gpu(group, gpu_options(R, int64_t(c.hidden) * 2, {c.config}, device));
    ArenaAllocator arena(device, size_t(64) << 20);
    PoisonAllocator poison;
    RankInputs inputs(c, rank, R);

    // The routing, once, eagerly (with a host wait): both backends.
    const DispatchResult gpu_fresh = gpu.dispatch(inputs.dispatch_inputs(true), {.allocator = &poison});
    const DispatchResult cpu_fresh = cpu.dispatch(inputs.dispatch_inputs(false), {.allocator = &poison});
    const int rows = gpu_fresh.handle->num_recv_tokens;
    ASSERT_EQ(rows, cpu_fresh.handle->num_recv_tokens);
    CombineFeed feed(rows, c.hidden, 3 + rank);

    Graph g;
    EPCOMM_TEST_CUDA(cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking));
    const StreamOptions on_graph{.stream = reinterpret_cast<StreamHandle>(g.stream), .allocator = &arena};
    const DispatchInputs gpu_in = inputs.dispatch_inputs(true);
    EPCOMM_TEST_CUDA(cudaStreamBeginCapture(g.stream, cudaStreamCaptureModeGlobal));
    DispatchInputs cached_in;
    cached_in.x = gpu_in.x;
    cached_in.x_scales = gpu_in.x_scales;
    cached_in.handle = gpu_fresh.handle.get();
    cached_in.config = c.config;
    const DispatchResult cached = gpu.dispatch(cached_in, on_graph);
    CombineInputs combine;
    combine.x = feed.view;
    combine.handle = gpu_fresh.handle.get();
    combine.topk_weights = gpu_fresh.recv_topk_weights;
    combine.config = c.config;
    const CombineResult combined = gpu.combine(combine, on_graph);
    EPCOMM_TEST_CUDA(cudaStreamEndCapture(g.stream, &g.graph));
    EPCOMM_TEST_CUDA(cudaGraphInstantiate(&g.exec, g.graph, 0));

    const int64_t real = real_rows_of(*cpu_fresh.handle, rank);
    for (int replay = 0; replay < kReplays; ++replay) {
      SCOPED_TRACE("replay " + std::to_string(replay));
      inputs.refresh(300 + replay, /*reroute=*/false);  // new x and scales, same routing
      feed.refresh(400 + replay * 10 + rank);
      arena.poison();
      EPCOMM_TEST_CUDA(cudaGraphLaunch(g.exec, g.stream));
      EPCOMM_TEST_CUDA(cudaStreamSynchronize(g.stream));
      ASSERT_NO_THROW(gpu.check_errors());

      const DispatchInputs cpu_in = inputs.dispatch_inputs(false);
      DispatchInputs ref_cached;
      ref_cached.x = cpu_in.x;
      ref_cached.x_scales = cpu_in.x_scales;
      ref_cached.handle = cpu_fresh.handle.get();
      ref_cached.config = c.config;
      const DispatchResult ref = cpu.dispatch(ref_cached, {.allocator = &poison});
      expect_same_rows("graph cached recv_x", ref.recv_x, cached.recv_x, real);
      expect_same_rows("graph cached recv_x_scales", *ref.recv_x_scales, *cached.recv_x_scales, real);
      CombineInputs ref_combine;
      ref_combine.x = feed.host_view();
      ref_combine.handle = cpu_fresh.handle.get();
      ref_combine.topk_weights = *cpu_fresh.recv_topk_weights;
      ref_combine.config = c.config;
      const CombineResult ref_combined = cpu.combine(ref_combine, {.allocator = &poison});
      expect_same_rows("graph combined_x", ref_combined.combined_x, combined.combined_x);
      expect_same_rows("graph combined_topk_weights", *ref_combined.combined_topk_weights,
                       *combined.combined_topk_weights);
      if (::testing::Test::HasFailure()) break;
    }
    gpu.destroy();
    cpu.destroy();
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, NormalModeGraphs, ::testing::ValuesIn(rank_counts()), ranks_name);

}  // namespace
}  // namespace epcomm::testing::normal
