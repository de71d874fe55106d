// Checks in one place (src/core/op_checks.cpp) against the backend's Limits, on the CPU backend:
// Buffer::limits(), UE8M0-packed int32 FP8 scales moved unchanged, and the inputs that used to be
// accepted though wrong or rejected with a misleading message.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "epcomm/epcomm.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

constexpr int kRanks = 2;

template <class Fn>
std::string error_of(Fn&& fn, ErrorCode expected) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), expected) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no epcomm::Error thrown";
  return {};
}

void expect_mentions(const std::string& message, std::initializer_list<const char*> fragments) {
  for (const char* f : fragments) EXPECT_NE(message.find(f), std::string::npos) << "'" << f << "' not in: " << message;
}

BufferOptions cpu_options(bool low_latency = false) {
  BufferOptions options;
  options.backend = BackendKind::kCpu;
  options.num_nvl_bytes = 4 << 20;
  options.low_latency_mode = low_latency;
  if (low_latency) options.num_rdma_bytes = low_latency_buffer_size_hint(16, 512, kRanks, 4 * kRanks);
  options.timeout = std::chrono::milliseconds(5000);
  return options;
}

// One rank's inputs of an FP8 dispatch with per-rank random sizes of the group's shape.
struct Fp8Tokens {
  int T, hidden, K, E;
  std::vector<uint8_t> x;       // [T, hidden] e4m3 bit patterns (finite)
  std::vector<int32_t> scales;  // [T, S] or, column-major, [S, T]
  std::vector<int64_t> topk;    // [T, K]
  bool column_major = false;

  Fp8Tokens(std::mt19937& rng, int rank, int hidden_, int S, bool column_major_)
      : T(3 + int(rng() % 9)), hidden(hidden_), K(2), E(4 * kRanks), column_major(column_major_) {
    x.resize(size_t(T) * hidden);
    for (auto& b : x) b = uint8_t(rng() & 0x77);  // never the NaN patterns 0x7F / 0xFF
    scales.resize(size_t(T) * S);
    for (int t = 0; t < T; ++t)
      for (int s = 0; s < S; ++s) scales[index(t, s, S)] = tag(rank, t, s);
    topk.resize(size_t(T) * K);
    for (int t = 0; t < T; ++t) {
      topk[t * K] = rng() % E;
      topk[t * K + 1] = (topk[t * K] + 1 + rng() % (E - 1)) % E;  // another expert
    }
  }
  size_t index(int t, int s, int S) const { return column_major ? size_t(s) * T + t : size_t(t) * S + s; }
  // The packed word every receiver can predict: four exponent bytes naming (rank, token, scale).
  static int32_t tag(int rank, int t, int s) { return int32_t(0x7F000000u | (rank << 16) | (t << 6) | s); }

  TensorView scales_view(int S) {
    if (!column_major) return TensorView::contiguous(scales.data(), DType::kInt32, {T, S}, Device::cpu());
    return TensorView::contiguous(scales.data(), DType::kInt32, {S, T}, Device::cpu()).transposed(0, 1);
  }
  DispatchInputs inputs(int S) {
    DispatchInputs in;
    in.x = TensorView::contiguous(x.data(), DType::kFloat8E4M3, {T, hidden}, Device::cpu());
    in.x_scales = scales_view(S);
    in.topk_idx = TensorView::contiguous(topk.data(), DType::kInt64, {T, K}, Device::cpu());
    in.num_experts = E;
    return in;
  }
};

// Every received row carries the scales its source sent, bit for bit, as int32 of the input's majorness.
void expect_scales_moved(const DispatchResult& result, int rank, int S, bool column_major) {
  ASSERT_TRUE(result.recv_x_scales.has_value());
  const Tensor& scales = *result.recv_x_scales;
  EXPECT_EQ(scales.dtype, DType::kInt32);
  const int64_t rows = result.recv_x.size(0);
  ASSERT_EQ(scales.size(0), rows);
  ASSERT_EQ(scales.size(1), S);
  EXPECT_EQ(scales.stride(1) == 1 || rows <= 1, !column_major) << "majorness not kept";
  const auto* prefix = result.handle->rank_prefix_matrix.data_as<const int32_t>();
  const auto* src = result.handle->recv_src_idx.data_as<const int32_t>();
  int64_t row = 0;
  for (int source = 0; source < kRanks; ++source) {
    const int64_t end = prefix[source * kRanks + rank];
    for (; row < end; ++row)
      for (int s = 0; s < S; ++s)
        ASSERT_EQ(scales.data_as<const int32_t>()[row * scales.stride(0) + s * scales.stride(1)],
                  Fp8Tokens::tag(source, src[row], s))
            << "row " << row << " from rank " << source << ", scale " << s;
  }
  EXPECT_EQ(row, rows);
}

TEST(Checks, BufferLimitsAreTheBackendsLimits) {
  run_ranks(kRanks, [](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_options());
    const Limits& limits = buffer.limits();
    const Limits expected = backend_limits(BackendKind::kCpu);
    EXPECT_EQ(limits.backend, BackendKind::kCpu);
    EXPECT_EQ(limits.max_topk, expected.max_topk);
    EXPECT_EQ(limits.scale_dtypes, expected.scale_dtypes);
    EXPECT_TRUE(limits.low_latency_mode);
    buffer.destroy();
    error_of([&] { buffer.limits(); }, ErrorCode::kInvalidArgument);  // "the Buffer was destroyed"
  });
}

// SPEC §1: UE8M0-packed int32 scales [T, hidden / 512] move unchanged, row- and column-major, in a
// fresh and in a cached dispatch.
TEST(Checks, PackedInt32ScalesMoveUnchanged) {
  run_ranks(kRanks, [](Bootstrap& bootstrap) {
    std::mt19937 rng(std::random_device{}() + bootstrap.rank());
    Buffer buffer(bootstrap, cpu_options());
    for (const bool column_major : {false, true}) {
      const int hidden = 1024, S = hidden / 512;
      Fp8Tokens tokens(rng, bootstrap.rank(), hidden, S, column_major);
      const DispatchInputs in = tokens.inputs(S);
      const DispatchResult fresh = buffer.dispatch(in);
      expect_scales_moved(fresh, bootstrap.rank(), S, column_major);
      DispatchInputs cached;
      cached.x = in.x;
      cached.x_scales = in.x_scales;
      cached.handle = fresh.handle.get();
      DispatchResult again = buffer.dispatch(cached);
      again.handle = fresh.handle;
      expect_scales_moved(again, bootstrap.rank(), S, column_major);
    }
    buffer.destroy();
  });
}

TEST(Checks, ScalesWithOtherColumnCountsAreNamed) {
  run_ranks(1, [](Bootstrap& bootstrap) {
    std::mt19937 rng(std::random_device{}());
    Buffer buffer(bootstrap, cpu_options());
    const int hidden = 256;
    for (const int S : {1, 7, 3}) {  // float32 wants 2, int32 cannot (256 % 512 != 0)
      Fp8Tokens tokens(rng, 0, hidden, S, false);
      DispatchInputs in = tokens.inputs(S);
      std::vector<float> floats(size_t(tokens.T) * S, 1.0f);
      in.x_scales = TensorView::contiguous(floats.data(), DType::kFloat32, {tokens.T, S}, Device::cpu());
      expect_mentions(error_of([&] { buffer.dispatch(in); }, ErrorCode::kInvalidArgument),
                      {"x_scales", "hidden / 128 = 2", std::to_string(S).c_str()});
    }
    Fp8Tokens tokens(rng, 0, hidden, 1, false);
    DispatchInputs in = tokens.inputs(1);
    expect_mentions(error_of([&] { buffer.dispatch(in); }, ErrorCode::kInvalidArgument),
                    {"x_scales", "multiple of 512"});
    Fp8Tokens wide(rng, 0, 1024, 4, false);  // int32 wants 1024 / 512 = 2
    in = wide.inputs(4);
    expect_mentions(error_of([&] { buffer.dispatch(in); }, ErrorCode::kInvalidArgument),
                    {"x_scales", "hidden / 512 = 2", "got 4"});
    std::vector<int64_t> bad(size_t(wide.T) * 2);
    in.x_scales = TensorView::contiguous(bad.data(), DType::kInt64, {wide.T, 2}, Device::cpu());
    expect_mentions(error_of([&] { buffer.dispatch(in); }, ErrorCode::kInvalidArgument),
                    {"x_scales", "float32 or int32"});
    buffer.destroy();
  });
}

// K = 0 and hidden = 0 say so (they used to say "expected a contiguous tensor ... strides").
TEST(Checks, ZeroTopkOrHiddenIsNamed) {
  run_ranks(1, [](Bootstrap& bootstrap) {
    Buffer buffer(bootstrap, cpu_options(/*low_latency=*/true));
    const int T = 4;
    std::vector<uint16_t> x(size_t(T) * 512, 0x3F80);
    std::vector<int64_t> topk(size_t(T) * 2, 0);
    // Strides as torch gives them for a [T, 0] tensor: (1, 1).
    TensorView no_topk = TensorView::contiguous(topk.data(), DType::kInt64, {T, 0}, Device::cpu());
    no_topk.strides = {1, 1};
    TensorView no_hidden = TensorView::contiguous(x.data(), DType::kBFloat16, {T, 0}, Device::cpu());
    no_hidden.strides = {1, 1};
    const TensorView good_x = TensorView::contiguous(x.data(), DType::kBFloat16, {T, 512}, Device::cpu());
    const TensorView good_topk = TensorView::contiguous(topk.data(), DType::kInt64, {T, 2}, Device::cpu());

    expect_mentions(error_of([&] { buffer.get_dispatch_layout(no_topk, 4); }, ErrorCode::kInvalidArgument),
                    {"topk_idx", "K = 0"});
    DispatchInputs in;
    in.x = good_x;
    in.topk_idx = no_topk;
    in.num_experts = 4;
    expect_mentions(error_of([&] { buffer.dispatch(in); }, ErrorCode::kInvalidArgument), {"topk_idx", "K = 0"});
    in.x = no_hidden;
    in.topk_idx = good_topk;
    expect_mentions(error_of([&] { buffer.dispatch(in); }, ErrorCode::kInvalidArgument), {"x", "hidden = 0"});
    LowLatencyDispatchInputs ll;
    ll.x = no_hidden;
    ll.topk_idx = good_topk;
    ll.num_max_dispatch_tokens_per_rank = 16;
    ll.num_experts = 4;
    expect_mentions(error_of([&] { buffer.low_latency_dispatch(ll); }, ErrorCode::kInvalidArgument),
                    {"x", "hidden = 0"});
    ll.x = good_x;
    ll.topk_idx = no_topk;
    expect_mentions(error_of([&] { buffer.low_latency_dispatch(ll); }, ErrorCode::kInvalidArgument),
                    {"topk_idx", "K = 0"});
    buffer.destroy();
  });
}

// Combine's topk_weights are the dispatch's recv_topk_weights: K + 2 columns used to be accepted.
TEST(Checks, CombineWeightsNeedTheDispatchesK) {
  run_ranks(kRanks, [](Bootstrap& bootstrap) {
    std::mt19937 rng(std::random_device{}() + bootstrap.rank());
    Buffer buffer(bootstrap, cpu_options());
    const int T = 2 + int(rng() % 6), hidden = 256, K = 2, E = 4 * kRanks;
    std::vector<uint16_t> x(size_t(T) * hidden);
    for (auto& v : x) v = uint16_t(0x3F00 + rng() % 0x100);
    std::vector<int64_t> topk(size_t(T) * K);
    for (int t = 0; t < T; ++t) topk[t * K] = rng() % E, topk[t * K + 1] = (topk[t * K] + 1) % E;
    std::vector<float> weights(size_t(T) * K, 0.5f);
    DispatchInputs in;
    in.x = TensorView::contiguous(x.data(), DType::kBFloat16, {T, hidden}, Device::cpu());
    in.topk_idx = TensorView::contiguous(topk.data(), DType::kInt64, {T, K}, Device::cpu());
    in.topk_weights = TensorView::contiguous(weights.data(), DType::kFloat32, {T, K}, Device::cpu());
    in.num_experts = E;
    const DispatchResult d = buffer.dispatch(in);
    const int64_t rows = d.recv_x.size(0);
    for (const int columns : {K + 2, K - 1}) {
      std::vector<float> wrong(size_t(rows) * columns, 1.0f);
      CombineInputs c;
      c.x = d.recv_x;
      c.handle = d.handle.get();
      c.topk_weights = TensorView::contiguous(wrong.data(), DType::kFloat32, {rows, columns}, Device::cpu());
      expect_mentions(error_of([&] { buffer.combine(c); }, ErrorCode::kInvalidArgument),
                      {"topk_weights", "K = 2", ("got K = " + std::to_string(columns)).c_str()});
    }
    CombineInputs c;
    c.x = d.recv_x;
    c.handle = d.handle.get();
    c.topk_weights = *d.recv_topk_weights;
    const CombineResult combined = buffer.combine(c);
    EXPECT_EQ(combined.combined_topk_weights->size(1), K);
    buffer.destroy();
  });
}

TEST(Checks, NegativeTimeoutIsAnError) {
  run_ranks(1, [](Bootstrap& bootstrap) {
    BufferOptions options = cpu_options();
    options.timeout = std::chrono::milliseconds(-1000);
    expect_mentions(error_of([&] { Buffer buffer(bootstrap, options); }, ErrorCode::kInvalidArgument),
                    {"timeout", "-1000"});
  });
}

// The low-latency-only calls say so from the front, once, for every call.
TEST(Checks, LowLatencyCallsOfANormalBufferAreNamed) {
  run_ranks(1, [](Bootstrap& bootstrap) {
    BufferOptions options = cpu_options();
    options.enable_shrink = true;
    Buffer buffer(bootstrap, options);
    const std::initializer_list<std::pair<const char*, std::function<void()>>> calls = {
        {"clean_low_latency_buffer", [&] { buffer.clean_low_latency_buffer(16, 512, 4); }},
        {"get_next_low_latency_combine_buffer", [&] { buffer.next_low_latency_combine_buffer(LowLatencyHandle{}); }},
        {"low_latency_update_mask_buffer", [&] { buffer.low_latency_update_mask_buffer(0, true); }},
        {"low_latency_query_mask_buffer", [&] { buffer.low_latency_query_mask_buffer(); }},
        {"low_latency_clean_mask_buffer", [&] { buffer.low_latency_clean_mask_buffer(); }},
        {"low_latency_dispatch", [&] { buffer.low_latency_dispatch(LowLatencyDispatchInputs{}); }},
        {"low_latency_combine", [&] { buffer.low_latency_combine(LowLatencyCombineInputs{}); }},
    };
    for (const auto& [op, call] : calls)
      expect_mentions(error_of(call, ErrorCode::kInvalidArgument), {op, "low_latency_mode=True"});
    buffer.destroy();
  });
}

}  // namespace
}  // namespace epcomm::testing
