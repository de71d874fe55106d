// Low-latency mode on GPUs when things go wrong (SPEC §5, §6): bad arguments, a rank that skips a
// call, masked and late ranks with enable_shrink.
#include <gtest/gtest.h>

#include <functional>

#include "ll_support.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing::ll {
namespace {

RunRanksOptions long_run() {
  RunRanksOptions options;
  options.timeout = std::chrono::seconds(600);
  return options;
}

// Expects `call` to throw epcomm::Error with `code`; returns its message.
std::string expect_error(ErrorCode code, const std::function<void()>& call, const std::string& what) {
  try {
    call();
  } catch (const Error& e) {
    EXPECT_EQ(int(e.code()), int(code)) << what << ": " << e.what();
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected epcomm::Error, got " << e.what();
    return "";
  }
  ADD_FAILURE() << what << ": expected an error, the call succeeded";
  return "";
}

TEST(LowLatencyGpuFaults, BadInputsGiveSpecErrorsAndTheBufferStaysUsable) {
  if (rank_counts().empty()) GTEST_SKIP() << "needs 2 GPUs";
  const int R = 2;
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int rank = group.rank();
        Case c;
        c.experts = 32 * R;
        Buffers b = make_buffers(group, {c});
        const Side gpu = gpu_side(b);
        Inputs in = make_inputs(c, rank, R, 900);
        Views dv = device_views(in, c, b.stream);
        const Device device = Device::cuda(b.device);

        auto with = [&](const std::function<void(LowLatencyDispatchInputs&, LowLatencyOptions&)>& edit) {
          return [&, edit] {
            LowLatencyDispatchInputs i;
            i.x = dv.x;
            i.topk_idx = dv.topk;
            i.num_max_dispatch_tokens_per_rank = c.max_tokens;
            i.num_experts = c.experts;
            LowLatencyOptions o;
            o.stream = b.stream;
            edit(i, o);
            b.gpu->low_latency_dispatch(i, o);
          };
        };
        DeviceMemory big = DeviceMemory::allocate(size_t(300) * 8192 * 4);
        expect_error(ErrorCode::kInvalidArgument, with([&](auto& i, auto&) {
                       i.x = TensorView::contiguous(big.get(), DType::kBFloat16, {129, c.hidden}, device);
                     }),
                     "T > T_max");
        expect_error(ErrorCode::kInvalidArgument, with([&](auto& i, auto&) {
                       i.x = TensorView::contiguous(big.get(), DType::kFloat32, {128, c.hidden}, device);
                     }),
                     "x float32");
        expect_error(ErrorCode::kInvalidArgument, with([&](auto& i, auto&) {
                       i.x = TensorView::contiguous(big.get(), DType::kBFloat16, {128, 100}, device);
                     }),
                     "hidden 100");
        expect_error(ErrorCode::kInvalidArgument, with([&](auto& i, auto&) {
                       i.topk_idx = TensorView::contiguous(big.get(), DType::kInt64, {128, 17}, device);
                     }),
                     "K = 17");
        expect_error(ErrorCode::kInvalidArgument, with([&](auto& i, auto&) { i.num_experts = 2 * R + 1; }),
                     "E not a multiple of R");
        expect_error(ErrorCode::kOutOfCapacity,
                     with([&](auto& i, auto&) { i.num_max_dispatch_tokens_per_rank = 1024; }), "buffer too small");
        expect_error(ErrorCode::kInvalidArgument,
                     with([&](auto&, auto& o) { o.async_finish = o.return_recv_hook = true; }),
                     "async_finish with return_recv_hook");
        expect_error(ErrorCode::kInvalidArgument, with([&](auto& i, auto&) {
                       i.x = TensorView::contiguous(big.get(), DType::kBFloat16, {128, c.hidden}, Device::cpu());
                     }),
                     "x on the CPU");

        // Three dispatches: the first handle is then too old for combine.
        std::vector<LowLatencyDispatchResult> ds;
        for (int i = 0; i < 3; ++i) {
          ds.push_back(dispatch(gpu, dv, c));
          finish(gpu, ds.back().hook);
        }
        ExpertOutputs experts = make_expert_outputs(c, R, read_dispatch(ds[0], c, R).recv_count, rank, 900);
        std::vector<DeviceMemory> keep;
        expect_error(
            ErrorCode::kInvalidArgument, [&] { combine(gpu, dv, c, ds[0].handle, experts, keep); },
            "combine with a handle older than the last two dispatches");
        expect_error(
            ErrorCode::kInvalidArgument,
            [&] {
              LowLatencyCombineInputs ci;
              ci.x = TensorView::contiguous(big.get(), DType::kBFloat16, {c.experts / R, R * c.max_tokens, c.hidden},
                                            device);
              ci.topk_idx = dv.topk;
              ci.topk_weights = dv.weights;
              ci.handle = &ds[2].handle;
              ci.zero_copy = true;
              LowLatencyOptions o;
              o.stream = b.stream;
              b.gpu->low_latency_combine(ci, o);
            },
            "zero_copy before get_next_low_latency_combine_buffer");
        expect_error(
            ErrorCode::kUnsupported,
            [&] {
              LowLatencyCombineInputs ci;
              ci.x = TensorView::contiguous(big.get(), DType::kBFloat16, {c.experts / R, R * c.max_tokens, c.hidden},
                                            device);
              ci.topk_idx = dv.topk;
              ci.topk_weights = dv.weights;
              ci.handle = &ds[2].handle;
              ci.use_logfmt = true;
              b.gpu->low_latency_combine(ci, {});
            },
            "use_logfmt");

        // An expert id out of [-1, E) on rank 0: the call still completes on every rank (the bad
        // slot is dropped), and rank 0's next call reports it.
        Inputs bad = in;
        if (rank == 0) bad.topk[5] = c.experts;
        Views bad_views = device_views(bad, c, b.stream);
        LowLatencyDispatchResult d = dispatch(gpu, bad_views, c);
        finish(gpu, d.hook);
        cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        if (rank == 0) {
          const std::string message = expect_error(
              ErrorCode::kInvalidArgument, [&] { b.gpu->next_low_latency_combine_buffer(d.handle); }, "topk_idx = E");
          EXPECT_NE(message.find(std::to_string(c.experts)), std::string::npos) << message;
        }
        // The buffer is still usable: a full round trip matches the reference.
        check_case(b, c, rank, R, 901);
        b.destroy();
      },
      long_run());
}

TEST(LowLatencyGpuFaults, ARankThatSkipsACallMakesItsPeersTimeOutNamingIt) {
  if (rank_counts().empty()) GTEST_SKIP() << "needs 2 GPUs";
  const int R = rank_counts().back() >= 3 ? 3 : 2;
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int rank = group.rank(), skipper = R - 1;
        Case c;
        c.experts = 32 * R;
        Buffers b = make_buffers(group, {c}, false, std::chrono::milliseconds(1000));
        if (rank != skipper) {
          Inputs in = make_inputs(c, rank, R, 1000);
          Views dv = device_views(in, c, b.stream);
          LowLatencyDispatchResult d = dispatch(gpu_side(b), dv, c);
          finish(gpu_side(b), d.hook);  // returns: the receive kernel gives up after the timeout
          const std::string message = expect_error(
              ErrorCode::kTimeout, [&] { b.gpu->next_low_latency_combine_buffer(d.handle); }, "the next call");
          EXPECT_NE(message.find(std::to_string(skipper)), std::string::npos)
              << "must name rank " << skipper << ": " << message;
          EXPECT_NE(message.find("dispatch"), std::string::npos) << "must name the operation: " << message;
        }
        group.barrier();
        b.destroy();  // still possible after a timeout
      },
      long_run());
}

TEST(LowLatencyGpuFaults, MaskedAndLateRanksAreSkippedWithEnableShrink) {
  if (rank_counts().empty()) GTEST_SKIP() << "needs 2 GPUs";
  const int R = rank_counts().back();
  run_ranks(
      R,
      [R](Bootstrap& group) {
        const int rank = group.rank(), absent = R - 1;
        Case c;
        c.experts = 32 * R, c.stats = true;
        Buffers b = make_buffers(group, {c}, /*enable_shrink=*/true, std::chrono::milliseconds(2000));
        // 1. Every other rank masks `absent` first.
        if (rank != absent) {
          b.cpu->low_latency_update_mask_buffer(absent, true);
          b.gpu->low_latency_update_mask_buffer(absent, true, b.stream);
          check_case(b, c, rank, R, 1100);
        }
        group.barrier();
        // 2. Nobody masks it: the waits time out, mask it and go on without it.
        if (rank != absent) {
          b.cpu->low_latency_clean_mask_buffer();
          b.gpu->low_latency_clean_mask_buffer(b.stream);
          check_case(b, c, rank, R, 1200);
          std::vector<int32_t> mask(R);
          cuda_check(
              cudaMemcpy(mask.data(), b.gpu->low_latency_query_mask_buffer().data, R * 4, cudaMemcpyDeviceToHost),
              "cudaMemcpy");
          for (int r = 0; r < R; ++r)
            EXPECT_EQ(mask[r], r == absent ? 1 : 0) << "rank " << rank << ": mask[" << r << "]";
        }
        group.barrier();
        b.destroy();
      },
      long_run());
}

}  // namespace
}  // namespace epcomm::testing::ll
