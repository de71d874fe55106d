// Low-latency mode's errors (SPEC §5): every bad input gives an epcomm::Error that names the
// argument and the value, and the buffer still works afterwards; a rank that skips a call makes
// its peers time out with an error naming the operation and that rank.
#include <gtest/gtest.h>

#include <functional>
#include <initializer_list>
#include <string>

#include "support/low_latency_micro_batch.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

void expect_error(const std::function<void()>& call, ErrorCode code, std::initializer_list<const char*> phrases) {
  try {
    call();
    ADD_FAILURE() << "expected an epcomm::Error, got none";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), code) << error.what();
    for (const char* phrase : phrases)
      EXPECT_NE(std::string(error.what()).find(phrase), std::string::npos)
          << "message '" << error.what() << "' does not mention '" << phrase << "'";
  }
}

// A full dispatch + combine with a fresh seed: the buffer still works.
void expect_round_trip_works(Buffer& buffer, const LowLatencyCase& c, int rank, uint64_t seed) {
  LowLatencyCase fresh = c;
  fresh.seed = seed;
  MicroBatch m(fresh, RecvFormat::kFp8, rank);
  m.dispatch_send(buffer, false);
  m.dispatch_finish();
  m.combine_send(buffer, {});
  m.combine_finish();
}

const LowLatencyCase kCase{2, 6, 256, 4, 5, {6, 4}, Routing::kRandom, 61};

// Inputs that the front rejects before any communication; every rank passes the same bad input.
TEST(LowLatencyErrors, BadArgumentsNameTheArgumentAndLeaveTheBufferUsable) {
  run_ranks(2, [&](Bootstrap& bootstrap) {
    const LowLatencyCase& c = kCase;
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    RankInputs in = make_inputs(c, rank);
    const auto cpu = Device::cpu();
    auto good = [&] { return dispatch_inputs(c, in, RecvFormat::kFp8); };

    std::vector<uint16_t> big_x(int64_t(c.max_tokens + 1) * c.hidden, 0x3F80);
    std::vector<int64_t> big_idx(int64_t(c.max_tokens + 1) * c.num_topk, 0);
    auto d = good();
    d.x = TensorView::contiguous(big_x.data(), DType::kBFloat16, {c.max_tokens + 1, c.hidden}, cpu);
    d.topk_idx = TensorView::contiguous(big_idx.data(), DType::kInt64, {c.max_tokens + 1, c.num_topk}, cpu);
    expect_error([&] { buffer.low_latency_dispatch(d); }, ErrorCode::kInvalidArgument,
                 {"low_latency_dispatch", "x", "T = 7", "num_max_dispatch_tokens_per_rank = 6"});

    std::vector<int64_t> wide_idx(int64_t(in.num_tokens) * 17, 0);
    d = good();
    d.topk_idx = TensorView::contiguous(wide_idx.data(), DType::kInt64, {in.num_tokens, 17}, cpu);
    expect_error([&] { buffer.low_latency_dispatch(d); }, ErrorCode::kInvalidArgument, {"topk_idx", "K = 17"});

    d = good();
    d.num_experts = 3;
    expect_error([&] { buffer.low_latency_dispatch(d); }, ErrorCode::kInvalidArgument, {"num_experts", "3"});

    std::vector<uint16_t> odd_x(int64_t(in.num_tokens) * 192, 0x3F80);
    d = good();
    d.x = TensorView::contiguous(odd_x.data(), DType::kBFloat16, {in.num_tokens, 192}, cpu);
    expect_error([&] { buffer.low_latency_dispatch(d); }, ErrorCode::kInvalidArgument, {"x", "hidden = 192"});

    d = good();
    d.use_ue8m0 = true;
    d.round_scale = false;
    expect_error([&] { buffer.low_latency_dispatch(d); }, ErrorCode::kInvalidArgument, {"use_ue8m0", "round_scale"});

    d = good();
    expect_error([&] { buffer.low_latency_dispatch(d, {.async_finish = true, .return_recv_hook = true}); },
                 ErrorCode::kInvalidArgument, {"async_finish", "return_recv_hook"});

    // Expert ids are checked by the backend, from the data.
    std::vector<int64_t> bad_idx = in.topk_idx;
    bad_idx[int64_t(in.num_tokens - 1) * c.num_topk + 2] = c.num_experts;
    d = good();
    d.topk_idx = TensorView::contiguous(bad_idx.data(), DType::kInt64, {in.num_tokens, c.num_topk}, cpu);
    expect_error([&] { buffer.low_latency_dispatch(d); }, ErrorCode::kInvalidArgument,
                 {"low_latency_dispatch", "topk_idx", "value 4", "num_experts = 4"});
    bad_idx[int64_t(in.num_tokens - 1) * c.num_topk + 2] = -2;
    expect_error([&] { buffer.low_latency_dispatch(d); }, ErrorCode::kInvalidArgument, {"topk_idx", "value -2"});

    expect_round_trip_works(buffer, c, rank, 62);

    // Combine's inputs, with a real handle.
    MicroBatch m(c, RecvFormat::kBf16, rank);
    m.dispatch_send(buffer, false);
    m.dispatch_finish();
    const int64_t L = c.num_local_experts(), rows = c.rows();
    std::vector<uint16_t> x(L * rows * c.hidden, 0x3F80);
    fill_expert_outputs(c, rank, m.dispatched(), x.data());
    auto good_combine = [&] {
      LowLatencyCombineInputs ci;
      ci.x = TensorView::contiguous(x.data(), DType::kBFloat16, {L, rows, c.hidden}, cpu);
      ci.topk_idx = TensorView::contiguous(m.mine().topk_idx.data(), DType::kInt64, {in.num_tokens, c.num_topk}, cpu);
      ci.topk_weights =
          TensorView::contiguous(m.mine().topk_weights.data(), DType::kFloat32, {in.num_tokens, c.num_topk}, cpu);
      ci.handle = &m.dispatched().handle;
      return ci;
    };
    auto ci = good_combine();
    ci.x = TensorView::contiguous(x.data(), DType::kBFloat16, {L, rows - 1, c.hidden}, cpu);
    expect_error([&] { buffer.low_latency_combine(ci); }, ErrorCode::kInvalidArgument, {"low_latency_combine", "x"});
    ci = good_combine();
    ci.x = TensorView::contiguous(x.data(), DType::kBFloat16, {L, rows, c.hidden / 2}, cpu);
    expect_error([&] { buffer.low_latency_combine(ci); }, ErrorCode::kInvalidArgument, {"x"});
    std::vector<uint16_t> small_out(16);
    ci = good_combine();
    ci.out = TensorView::contiguous(small_out.data(), DType::kBFloat16, {1, 16}, cpu);
    expect_error([&] { buffer.low_latency_combine(ci); }, ErrorCode::kInvalidArgument, {"out"});
    std::vector<int64_t> bad_combine_idx = m.mine().topk_idx;
    bad_combine_idx[0] = 99;
    ci = good_combine();
    ci.topk_idx = TensorView::contiguous(bad_combine_idx.data(), DType::kInt64, {in.num_tokens, c.num_topk}, cpu);
    expect_error([&] { buffer.low_latency_combine(ci); }, ErrorCode::kInvalidArgument, {"topk_idx", "value 99"});

    // A damaged handle is caught before anything is read through it.
    LowLatencyHandle damaged = m.dispatched().handle;
    std::vector<int64_t> range(damaged.layout_range.data_as<int64_t>(),
                               damaged.layout_range.data_as<int64_t>() + L * c.num_ranks);
    range[1] = (int64_t(rows) << 32) | 1;
    damaged.layout_range = Tensor::borrowed(TensorView::contiguous(range.data(), DType::kInt64, {L, c.num_ranks}, cpu));
    ci = good_combine();
    ci.handle = &damaged;
    expect_error([&] { buffer.low_latency_combine(ci); }, ErrorCode::kInvalidArgument, {"handle.layout_range"});
    damaged = m.dispatched().handle;
    std::vector<int32_t> info(damaged.src_info.data_as<int32_t>(), damaged.src_info.data_as<int32_t>() + L * rows);
    for (int l = 0; l < L; ++l) info[l * rows] = c.max_tokens;  // row 0 of every expert
    damaged.src_info = Tensor::borrowed(TensorView::contiguous(info.data(), DType::kInt32, {L, rows}, cpu));
    bool any_row = false;
    for (int l = 0; l < L; ++l) any_row |= m.dispatched().recv_count.data_as<int32_t>()[l] > 0;
    if (any_row) {  // the seed gives every rank rows; kept conditional so the test reads right anyway
      ci.handle = &damaged;
      expect_error([&] { buffer.low_latency_combine(ci); }, ErrorCode::kInvalidArgument, {"handle.src_info"});
    }

    // The combine of that dispatch still works, and so does everything after.
    m.combine_send(buffer, {});
    m.combine_finish();
    expect_round_trip_works(buffer, c, rank, 63);
    buffer.destroy();
  });
}

TEST(LowLatencyErrors, BufferWithoutLowLatencyMode) {
  run_ranks(2, [&](Bootstrap& bootstrap) {
    BufferOptions options = low_latency_options(kCase);
    options.low_latency_mode = false;
    Buffer buffer(bootstrap, options);
    RankInputs in = make_inputs(kCase, bootstrap.rank());
    expect_error([&] { buffer.low_latency_dispatch(dispatch_inputs(kCase, in, RecvFormat::kBf16)); },
                 ErrorCode::kInvalidArgument, {"low_latency_mode"});
    expect_error([&] { buffer.clean_low_latency_buffer(kCase.max_tokens, kCase.hidden, kCase.num_experts); },
                 ErrorCode::kInvalidArgument, {"low_latency_mode"});
    buffer.destroy();
  });
}

TEST(LowLatencyErrors, TooSmallBufferStatesTheSizeNeeded) {
  run_ranks(2, [&](Bootstrap& bootstrap) {
    const LowLatencyCase& c = kCase;
    BufferOptions options = low_latency_options(c);
    const int64_t needed = options.num_rdma_bytes;
    options.num_rdma_bytes = needed - 1;
    Buffer buffer(bootstrap, options);
    RankInputs in = make_inputs(c, bootstrap.rank());
    expect_error([&] { buffer.low_latency_dispatch(dispatch_inputs(c, in, RecvFormat::kBf16)); },
                 ErrorCode::kOutOfCapacity, {"num_rdma_bytes", std::to_string(needed).c_str()});
    // The zero-copy view is refused too (the front checks only the handle there).
    LowLatencyHandle handle;
    const int64_t L = c.num_local_experts();
    std::vector<int32_t> info(L * c.rows(), 0);
    std::vector<int64_t> range(L * c.num_ranks, 0);
    handle.src_info =
        Tensor::borrowed(TensorView::contiguous(info.data(), DType::kInt32, {L, c.rows()}, Device::cpu()));
    handle.layout_range =
        Tensor::borrowed(TensorView::contiguous(range.data(), DType::kInt64, {L, c.num_ranks}, Device::cpu()));
    handle.num_max_dispatch_tokens_per_rank = c.max_tokens;
    handle.hidden = c.hidden;
    handle.num_experts = c.num_experts;
    expect_error([&] { buffer.next_low_latency_combine_buffer(handle); }, ErrorCode::kOutOfCapacity,
                 {"get_next_low_latency_combine_buffer", "num_rdma_bytes"});
    // Smaller calls still fit and work.
    LowLatencyCase smaller = c;
    smaller.max_tokens = 4;
    smaller.tokens = {4, 2};
    expect_round_trip_works(buffer, smaller, bootstrap.rank(), 64);
    buffer.destroy();
  });
}

// Ranks that make different calls get an error naming both calls instead of wrong data, and the
// buffer stays usable.
TEST(LowLatencyErrors, RanksMakingDifferentCallsAreDetected) {
  run_ranks(2, [&](Bootstrap& bootstrap) {
    const LowLatencyCase& c = kCase;
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    RankInputs in = make_inputs(c, rank);
    // Different formats.
    expect_error(
        [&] { buffer.low_latency_dispatch(dispatch_inputs(c, in, rank == 0 ? RecvFormat::kBf16 : RecvFormat::kFp8)); },
        ErrorCode::kInvalidArgument, {"low_latency_dispatch", "same low-latency calls", "rank 1", "fp8"});
    // A dispatch on one rank meets a combine on the other.
    MicroBatch m(c, RecvFormat::kBf16, rank);
    m.dispatch_send(buffer, false);
    m.dispatch_finish();
    if (rank == 0) {
      expect_error([&] { buffer.low_latency_dispatch(dispatch_inputs(c, in, RecvFormat::kBf16)); },
                   ErrorCode::kInvalidArgument, {"low_latency_combine"});
    } else {
      expect_error([&] { m.combine_send(buffer, {}); }, ErrorCode::kInvalidArgument, {"low_latency_dispatch"});
    }
    expect_round_trip_works(buffer, c, rank, 65);
    buffer.destroy();
  });
}

// A combine whose topk_idx names an expert the handle's dispatch did not send the token to.
TEST(LowLatencyErrors, CombineWithOtherRoutingThanItsDispatch) {
  run_ranks(2, [&](Bootstrap& bootstrap) {
    const LowLatencyCase& c = kCase;
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    MicroBatch m(c, RecvFormat::kBf16, rank);
    m.dispatch_send(buffer, false);
    m.dispatch_finish();
    const int64_t L = c.num_local_experts(), rows = c.rows();
    std::vector<uint16_t> x(L * rows * c.hidden);
    fill_expert_outputs(c, rank, m.dispatched(), x.data());
    std::vector<int64_t> other = m.mine().topk_idx;
    // Token 0 of rank 0 names, in slot 0, an expert it did not name in the dispatch.
    int unused = 0;
    if (rank == 0) {
      auto named = [&](int e) {
        for (int k = 0; k < c.num_topk; ++k)
          if (other[k] == e) return true;
        return false;
      };
      while (named(unused)) ++unused;
      ASSERT_LT(unused, c.num_experts) << "pick another seed: token 0 names every expert";
      other[0] = unused;
    }
    LowLatencyCombineInputs ci;
    ci.x = TensorView::contiguous(x.data(), DType::kBFloat16, {L, rows, c.hidden}, Device::cpu());
    ci.topk_idx = TensorView::contiguous(other.data(), DType::kInt64, {m.mine().num_tokens, c.num_topk}, Device::cpu());
    ci.topk_weights = TensorView::contiguous(m.mine().topk_weights.data(), DType::kFloat32,
                                             {m.mine().num_tokens, c.num_topk}, Device::cpu());
    ci.handle = &m.dispatched().handle;
    if (rank == 0) {
      expect_error([&] { buffer.low_latency_combine(ci); }, ErrorCode::kInvalidArgument,
                   {"topk_idx", "[0, 0]", ("expert " + std::to_string(unused)).c_str()});
    } else {
      check_combine(c, m.mine(), rank, buffer.low_latency_combine(ci).combined_x, {false, false});
    }
    expect_round_trip_works(buffer, c, rank, 66);
    buffer.destroy();
  });
}

TEST(LowLatencyErrors, HookRunsOnceAndNotAfterCleanOrDestroy) {
  run_ranks(2, [&](Bootstrap& bootstrap) {
    const LowLatencyCase& c = kCase;
    Buffer buffer(bootstrap, low_latency_options(c));
    const int rank = bootstrap.rank();
    RankInputs in = make_inputs(c, rank);
    auto sent = buffer.low_latency_dispatch(dispatch_inputs(c, in, RecvFormat::kBf16), {.return_recv_hook = true});
    RecvHook copy = sent.hook;
    sent.hook();
    expect_error([&] { copy(); }, ErrorCode::kInvalidArgument, {"recv hook", "already ran"});

    auto cancelled = buffer.low_latency_dispatch(dispatch_inputs(c, in, RecvFormat::kBf16), {.return_recv_hook = true});
    buffer.clean_low_latency_buffer(c.max_tokens, c.hidden, c.num_experts);
    expect_error([&] { cancelled.hook(); }, ErrorCode::kInvalidArgument, {"clean_low_latency_buffer"});
    expect_round_trip_works(buffer, c, rank, 67);

    auto orphan = buffer.low_latency_dispatch(dispatch_inputs(c, in, RecvFormat::kBf16), {.return_recv_hook = true});
    buffer.destroy();
    expect_error([&] { orphan.hook(); }, ErrorCode::kInvalidArgument, {"destroyed"});
  });
}

// ---- timeouts -----------------------------------------------------------------------------------

BufferOptions short_timeout_options(const LowLatencyCase& c) {
  BufferOptions options = low_latency_options(c);
  options.timeout = std::chrono::milliseconds(1000);
  return options;
}

TEST(LowLatencyTimeout, RankSkippingADispatchIsNamed) {
  const LowLatencyCase c{3, 4, 128, 6, 4, {4, 4, 4}, Routing::kRandom, 71};
  run_ranks(3, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, short_timeout_options(c));
    const int rank = bootstrap.rank();
    RankInputs in = make_inputs(c, rank);
    if (rank != 2) {
      expect_error([&] { buffer.low_latency_dispatch(dispatch_inputs(c, in, RecvFormat::kBf16)); }, ErrorCode::kTimeout,
                   {"low_latency_dispatch", "rank 2"});
    }
    bootstrap.barrier();
    buffer.destroy();
  });
}

TEST(LowLatencyTimeout, RankSkippingACombineIsNamed) {
  const LowLatencyCase c{3, 4, 128, 6, 4, {4, 4, 4}, Routing::kRandom, 72};
  run_ranks(3, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, short_timeout_options(c));
    const int rank = bootstrap.rank();
    MicroBatch m(c, RecvFormat::kBf16, rank);
    m.dispatch_send(buffer, /*hook=*/true);
    m.dispatch_finish();
    if (rank != 1) {
      expect_error([&] { m.combine_send(buffer, {}); }, ErrorCode::kTimeout, {"low_latency_combine", "rank 1"});
    }
    bootstrap.barrier();
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
