// Bad inputs to high-throughput mode (SPEC §5): each raises an epcomm::Error that names the argument
// (and the value), and the buffer keeps working: a good round trip runs after every bad call. Then
// a rank that skips a call makes its peers time out naming it, and a bad input on one rank only is
// raised by every rank at that call (test_failsafe.cpp has the fail-safe protocol's own tests).
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "support/multirank.hpp"
#include "support/normal_checks.hpp"

namespace epcomm::testing {
namespace {

using namespace std::chrono_literals;

// Runs `call` and checks that it throws Error(code) whose message contains every word.
void expect_error(const std::function<void()>& call, ErrorCode code, const std::vector<std::string>& words) {
  try {
    call();
    ADD_FAILURE() << "expected an epcomm::Error (" << to_string(code) << "), nothing was thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const std::string& word : words)
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << "message lacks '" << word << "': " << e.what();
  }
}

NormalCase good_case() {
  NormalCase c;
  c.num_ranks = 2;
  c.num_tokens = {24, 17};
  c.hidden = 256;
  c.num_topk = 4;
  c.num_experts = 8;
  c.empty_fraction = 0.1;
  c.seed = 77;
  return c;
}

// Everything a bad call is made from, on one rank: valid inputs to spoil, and a valid handle.
struct Fixture {
  Buffer& buffer;
  NormalCase c = good_case();
  RankCall call;
  DispatchResult dispatched;
  std::vector<uint16_t> y;  // [num_recv, hidden] expert outputs
  PoisonAllocator poison;

  explicit Fixture(Buffer& b) : buffer(b) {
    prepare_call(call, c, DispatchOptions{}, buffer);
    dispatched = buffer.dispatch(call.dispatch);
    y.assign(size_t(dispatched.handle->num_recv_tokens) * c.hidden, 0x3F80);  // 1.0
  }
  int T() const { return call.inputs.num_tokens; }
  DispatchInputs good() const { return call.dispatch; }
  CombineInputs good_combine() {
    CombineInputs in;
    in.x = view_of(y, DType::kBFloat16, {dispatched.handle->num_recv_tokens, c.hidden});
    in.handle = dispatched.handle.get();
    return in;
  }
  DispatchResult dispatch(const DispatchInputs& in) { return buffer.dispatch(in, {.allocator = &poison}); }
  CombineResult combine(const CombineInputs& in) { return buffer.combine(in, {.allocator = &poison}); }
};

struct BadCall {
  const char* name;
  ErrorCode code;
  std::vector<std::string> words;
  std::function<void(Fixture&)> call;
};

std::vector<BadCall> bad_calls() {
  constexpr auto kInvalid = ErrorCode::kInvalidArgument;
  std::vector<BadCall> calls;
  auto add = [&](const char* name, ErrorCode code, std::vector<std::string> words, std::function<void(Fixture&)> f) {
    calls.push_back({name, code, std::move(words), std::move(f)});
  };
  // topk_idx values outside [-1, E): found by the backend, on the data.
  add("topk_idx_equal_to_E", kInvalid, {"dispatch", "topk_idx", "value 8", "[3, 1]", "[-1, 8)"}, [](Fixture& f) {
    std::vector<int64_t> idx = f.call.inputs.topk_idx;
    idx[3 * 4 + 1] = 8;
    DispatchInputs in = f.good();
    in.topk_idx = view_of(idx, DType::kInt64, {f.T(), 4});
    f.dispatch(in);
  });
  add("topk_idx_minus_two_int32", kInvalid, {"topk_idx", "value -2", "[0, 3]"}, [](Fixture& f) {
    std::vector<int32_t> idx(f.call.inputs.topk_idx.begin(), f.call.inputs.topk_idx.end());
    idx[3] = -2;
    DispatchInputs in = f.good();
    in.topk_idx = view_of(idx, DType::kInt32, {f.T(), 4});
    f.dispatch(in);
  });
  add("layout_topk_idx_out_of_range", kInvalid, {"get_dispatch_layout", "topk_idx", "value 1000"}, [](Fixture& f) {
    std::vector<int64_t> idx = f.call.inputs.topk_idx;
    idx.back() = 1000;
    f.buffer.get_dispatch_layout(view_of(idx, DType::kInt64, {f.T(), 4}), 8);
  });
  // Layout tensors that disagree with the routing.
  add("num_tokens_per_rank_inconsistent", kInvalid, {"num_tokens_per_rank", "entry 1"}, [](Fixture& f) {
    const LayoutResult layout = f.buffer.get_dispatch_layout(*f.good().topk_idx, 8);
    layout.num_tokens_per_rank.data_as<int32_t>()[1] += 1;
    DispatchInputs in = f.good();
    in.num_tokens_per_rank = layout.num_tokens_per_rank;
    f.dispatch(in);
  });
  add("num_tokens_per_expert_inconsistent", kInvalid, {"num_tokens_per_expert", "entry 5"}, [](Fixture& f) {
    const LayoutResult layout = f.buffer.get_dispatch_layout(*f.good().topk_idx, 8);
    layout.num_tokens_per_expert.data_as<int32_t>()[5] += 3;
    DispatchInputs in = f.good();
    in.num_tokens_per_expert = layout.num_tokens_per_expert;
    f.dispatch(in);
  });
  // Shapes, dtypes, devices, contiguity, sizes: found by the front's checks.
  add("x_dtype", kInvalid, {"x", "float32"}, [](Fixture& f) {
    std::vector<float> x(size_t(f.T()) * 256, 1.0f);
    DispatchInputs in = f.good();
    in.x = view_of(x, DType::kFloat32, {f.T(), 256});
    f.dispatch(in);
  });
  add("x_not_contiguous", kInvalid, {"x", "contiguous"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.x.strides[0] = 512;
    f.dispatch(in);
  });
  add("x_on_cuda", kInvalid, {"x", "cuda"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.x.device = Device::cuda(0);
    f.dispatch(in);
  });
  add("hidden_not_16_bytes", kInvalid, {"x", "hidden = 100"}, [](Fixture& f) {
    std::vector<uint16_t> x(size_t(f.T()) * 100, 0x3F80);
    DispatchInputs in = f.good();
    in.x = view_of(x, DType::kBFloat16, {f.T(), 100});
    f.dispatch(in);
  });
  add("topk_idx_rows", kInvalid, {"topk_idx", "[T, K]"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.topk_idx->shape[0] -= 1;
    in.topk_weights.reset();
    f.dispatch(in);
  });
  add("topk_k_33", kInvalid, {"topk_idx", "K = 33"}, [](Fixture& f) {
    std::vector<int64_t> idx(size_t(f.T()) * 33, -1);
    DispatchInputs in = f.good();
    in.topk_idx = view_of(idx, DType::kInt64, {f.T(), 33});
    in.topk_weights.reset();
    f.dispatch(in);
  });
  add("topk_weights_dtype", kInvalid, {"topk_weights", "int64"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.topk_weights->dtype = DType::kInt64;
    f.dispatch(in);
  });
  add("num_experts_not_multiple_of_R", kInvalid, {"num_experts", "got 7"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.num_experts = 7;
    f.dispatch(in);
  });
  add("fp8_without_scales", kInvalid, {"x_scales", "required"}, [](Fixture& f) {
    std::vector<uint8_t> x(size_t(f.T()) * 256, 0x38);
    DispatchInputs in = f.good();
    in.x = view_of(x, DType::kFloat8E4M3, {f.T(), 256});
    f.dispatch(in);
  });
  add("is_token_in_rank_shape", kInvalid, {"is_token_in_rank", "[T, R]"}, [](Fixture& f) {
    std::vector<uint8_t> flags(size_t(f.T()) * 3, 1);
    DispatchInputs in = f.good();
    in.is_token_in_rank = view_of(flags, DType::kBool, {f.T(), 3});
    f.dispatch(in);
  });
  add("expert_alignment_zero", kInvalid, {"expert_alignment", "got 0"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.expert_alignment = 0;
    f.dispatch(in);
  });
  add("num_worst_tokens_negative", kInvalid, {"num_worst_tokens", "got -1"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.num_worst_tokens = -1;
    f.dispatch(in);
  });
  add("config_odd_sms", kInvalid, {"num_sms", "got 3"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.config = Config{.num_sms = 3};
    f.dispatch(in);
  });
  // Cached dispatch and combine misuse.
  add("cached_with_topk", kInvalid, {"handle", "None"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.handle = f.dispatched.handle.get();
    f.dispatch(in);
  });
  add("cached_wrong_token_count", kInvalid, {"x", "handle was made for"}, [](Fixture& f) {
    std::vector<uint16_t> x(size_t(f.T() + 1) * 256, 0x3F80);
    DispatchInputs in;
    in.x = view_of(x, DType::kBFloat16, {f.T() + 1, 256});
    in.handle = f.dispatched.handle.get();
    f.dispatch(in);
  });
  add("combine_without_handle", kInvalid, {"combine", "handle"}, [](Fixture& f) {
    CombineInputs in = f.good_combine();
    in.handle = nullptr;
    f.combine(in);
  });
  add("combine_x_rows", kInvalid, {"combine", "x", "num_recv_tokens"}, [](Fixture& f) {
    CombineInputs in = f.good_combine();
    in.x.shape[0] += 1;
    f.combine(in);
  });
  add("combine_weights_rows", kInvalid, {"topk_weights"}, [](Fixture& f) {
    std::vector<float> w(size_t(f.dispatched.handle->num_recv_tokens + 2) * 4, 1.0f);
    CombineInputs in = f.good_combine();
    in.topk_weights = view_of(w, DType::kFloat32, {f.dispatched.handle->num_recv_tokens + 2, 4});
    f.combine(in);
  });
  add("combine_bias_shape", kInvalid, {"bias_1", "[T, hidden]"}, [](Fixture& f) {
    std::vector<uint16_t> bias(size_t(f.T()) * 128, 0x3F80);
    CombineInputs in = f.good_combine();
    in.bias_1 = view_of(bias, DType::kBFloat16, {f.T(), 128});
    f.combine(in);
  });
  add("combine_handle_of_destroyed_buffer", kInvalid, {"handle", "another Buffer"}, [](Fixture& f) {
    DispatchHandle foreign = *f.dispatched.handle;
    foreign.buffer_id += 1000;  // the id of no live Buffer
    CombineInputs in = f.good_combine();
    in.handle = &foreign;
    f.combine(in);
  });
  // Capacity: found after the exchange, so every rank raises together.
  add("num_worst_tokens_too_small", ErrorCode::kOutOfCapacity, {"num_worst_tokens", "receives", "= 2"}, [](Fixture& f) {
    DispatchInputs in = f.good();
    in.num_worst_tokens = 2;
    f.dispatch(in);
  });
  add("token_too_big_for_buffer", ErrorCode::kOutOfCapacity, {"num_nvl_bytes", "needs", "nvl_buffer_size_hint"},
      [](Fixture& f) {
        const int hidden = 40960;  // one record of this hidden does not fit the test's buffer
        std::vector<uint16_t> x(size_t(f.T()) * hidden, 0x3F80);
        DispatchInputs in = f.good();
        in.x = view_of(x, DType::kBFloat16, {f.T(), hidden});
        f.dispatch(in);
      });
  return calls;
}

// Every rank passes the same bad input; the buffer must stay usable.
TEST(NormalModeErrors, EveryBadInputNamesItsArgumentAndTheBufferKeepsWorking) {
  NormalCase c = good_case();
  c.ranks_per_node = 1;  // the reference follows the buffer's two nodes (SPEC §3.6 combine order)
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    BufferOptions options = cpu_buffer_options(small_nvl_bytes(c), 20s);
    options.ranks_per_node = 1;  // two nodes: num_tokens_per_rdma_rank exists
    Buffer buffer(bootstrap, options);
    Fixture fixture(buffer);
    for (const BadCall& bad : bad_calls()) {
      SCOPED_TRACE(bad.name);
      expect_error([&] { bad.call(fixture); }, bad.code, bad.words);
      round_trip(buffer, c, DispatchOptions{}, 1);
    }
    buffer.destroy();
  });
}

TEST(NormalModeErrors, InconsistentRdmaCountsNameTheTensor) {
  NormalCase c = good_case();
  c.ranks_per_node = 1;
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    BufferOptions options = cpu_buffer_options(small_nvl_bytes(c), 20s);
    options.ranks_per_node = 1;
    Buffer buffer(bootstrap, options);
    Fixture f(buffer);
    const LayoutResult layout = buffer.get_dispatch_layout(*f.good().topk_idx, 8);
    ASSERT_TRUE(layout.num_tokens_per_rdma_rank.has_value());
    layout.num_tokens_per_rdma_rank->data_as<int32_t>()[0] += 1;
    DispatchInputs in = f.good();
    in.num_tokens_per_rdma_rank = *layout.num_tokens_per_rdma_rank;
    expect_error([&] { f.dispatch(in); }, ErrorCode::kInvalidArgument, {"num_tokens_per_rdma_rank", "entry 0"});
    round_trip(buffer, c, DispatchOptions{}, 0);
    buffer.destroy();
  });
}

// Ranks whose calls disagree: every rank sees it in the exchange and raises; the buffer stays usable.
TEST(NormalModeErrors, RanksThatDisagreeAllRaise) {
  const NormalCase c = good_case();
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 20s));
    Fixture f(buffer);
    const int rank = buffer.rank();
    {
      SCOPED_TRACE("hidden differs");
      std::vector<uint16_t> x(size_t(f.T()) * 128, 0x3F80);
      DispatchInputs in = f.good();
      if (rank == 1) in.x = view_of(x, DType::kBFloat16, {f.T(), 128});
      expect_error([&] { f.dispatch(in); }, ErrorCode::kInvalidArgument, {"x", "hidden", "rank"});
      round_trip(buffer, c, DispatchOptions{}, 0);
    }
    {
      SCOPED_TRACE("weights on one rank only");
      DispatchInputs in = f.good();
      if (rank == 0) in.topk_weights.reset();
      expect_error([&] { f.dispatch(in); }, ErrorCode::kInvalidArgument, {"topk_weights"});
      round_trip(buffer, c, DispatchOptions{}, 0);
    }
    {
      SCOPED_TRACE("different calls");
      std::vector<uint16_t> x(size_t(f.T()) * 256, 0x3F80);
      DispatchInputs cached;
      cached.x = view_of(x, DType::kBFloat16, {f.T(), 256});
      cached.handle = f.dispatched.handle.get();
      if (rank == 0)
        expect_error([&] { f.combine(f.good_combine()); }, ErrorCode::kInvalidArgument,
                     {"call order", "cached dispatch"});
      else
        expect_error([&] { f.dispatch(cached); }, ErrorCode::kInvalidArgument, {"call order", "combine"});
      round_trip(buffer, c, DispatchOptions{}, 0);
    }
    {
      SCOPED_TRACE("handles of different dispatches");
      const DispatchResult second = buffer.dispatch(f.good());
      CombineInputs in = f.good_combine();
      std::vector<uint16_t> y2(size_t(second.handle->num_recv_tokens) * c.hidden, 0x3F80);
      if (rank == 1) {
        in.handle = second.handle.get();
        in.x = view_of(y2, DType::kBFloat16, {second.handle->num_recv_tokens, c.hidden});
      }
      expect_error([&] { f.combine(in); }, ErrorCode::kInvalidArgument, {"handle", "different dispatch"});
      round_trip(buffer, c, DispatchOptions{}, 0);
    }
    buffer.destroy();
  });
}

// Three ranks with different token counts: small enough for the timeout tests.
NormalCase three_rank_case() {
  NormalCase c = good_case();
  c.num_ranks = 3;
  c.num_tokens = {10, 11, 12};
  c.num_experts = 6;
  return c;
}

// A rank that skips a call: its peers time out naming it, and everyone can still destroy the buffer.
TEST(NormalModeErrors, SkippedCallTimesOutNamingTheRank) {
  const NormalCase c = three_rank_case();
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, buffer);
    if (buffer.rank() != 2)
      expect_error([&] { buffer.dispatch(call.dispatch); }, ErrorCode::kTimeout, {"dispatch", "rank(s) 2"});
    bootstrap.barrier();
    buffer.destroy();
  });
}

// Bad input on one rank only: it is rejected in the call's exchange, so every rank raises at that
// call (the peers naming rank 1 and its error), and the Buffer stays usable (SPEC §5).
TEST(NormalModeErrors, BadInputOnOneRankIsRaisedByEveryRank) {
  const NormalCase c = three_rank_case();
  run_ranks(c.num_ranks, [&](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_buffer_options(small_nvl_bytes(c), 1000ms));
    RankCall call;
    prepare_call(call, c, DispatchOptions{}, buffer);
    const int64_t good_value = call.inputs.topk_idx[5];
    if (buffer.rank() == 1) call.inputs.topk_idx[5] = 6;
    const char* who = buffer.rank() == 1 ? "topk_idx" : "rank 1 rejected its inputs";
    expect_error([&] { buffer.dispatch(call.dispatch); }, ErrorCode::kInvalidArgument, {who, "value 6"});
    call.inputs.topk_idx[5] = good_value;
    round_trip(buffer, c, DispatchOptions{}, 0);
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
