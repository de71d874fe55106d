#include "normal_checks.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <string>

namespace epcomm::testing {
namespace {

// Stop reporting after a few mismatches: one wrong routing decision would otherwise print thousands.
constexpr int kMaxReports = 5;

template <class T>
T element(const TensorView& t, int64_t i, int64_t j) {
  return t.data_as<const T>()[i * t.stride(0) + j * t.stride(1)];
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Compares a 2-D output [rows, cols] with expected values for its first rows (bitwise).
template <class T>
void expect_matrix(const TensorView& actual, const std::vector<T>& expected, int64_t cols, const char* what) {
  const int64_t rows = cols == 0 ? 0 : int64_t(expected.size()) / cols;
  int reports = 0;
  for (int64_t i = 0; i < rows && reports < kMaxReports; ++i)
    for (int64_t j = 0; j < cols && reports < kMaxReports; ++j) {
      const T got = element<T>(actual, i, j), want = expected[i * cols + j];
      if (!same_bits(got, want)) {
        ADD_FAILURE() << what << "[" << i << ", " << j << "]: expected " << want << ", got " << got;
        ++reports;
      }
    }
}

void expect_shape(const TensorView& t, std::initializer_list<int64_t> shape, DType dtype, const char* what) {
  EXPECT_EQ(t.ndim, int(shape.size())) << what;
  int d = 0;
  for (int64_t s : shape) EXPECT_EQ(t.size(d++), s) << what << " dim " << d - 1;
  EXPECT_EQ(t.dtype, dtype) << what;
}

using SourceRow = std::function<const void*(int source, int token)>;

// recv_x rows [0, rows.size()) hold the source rows the reference lists, in order.
void expect_recv_rows(const NormalCase& c, const std::vector<ReceivedRow>& rows, const TensorView& recv_x,
                      const SourceRow& source_row, const char* what) {
  const size_t row_bytes = size_t(c.hidden) * dtype_size(recv_x.dtype);
  int reports = 0;
  for (size_t i = 0; i < rows.size() && reports < kMaxReports; ++i) {
    const auto* got = static_cast<const std::byte*>(recv_x.data) + i * row_bytes;
    if (std::memcmp(got, source_row(rows[i].source, rows[i].token), row_bytes) == 0) continue;
    const std::string found = recv_x.dtype == DType::kBFloat16
                                  ? describe_tagged_row(reinterpret_cast<const uint16_t*>(got))
                                  : std::string("(fp8 payload)");
    ADD_FAILURE() << what << " row " << i << ": expected (rank " << rows[i].source << ", token " << rows[i].token
                  << "), found " << found;
    ++reports;
  }
}

// recv_x_scales rows, read through the output's strides, and its majorness.
void expect_recv_scales(const NormalCase& c, const std::vector<RankInputs>& all, const std::vector<ReceivedRow>& rows,
                        const TensorView& scales, int num_rows, bool column_major) {
  const int S = c.num_scales();
  expect_shape(scales, {num_rows, S}, DType::kFloat32, "recv_x_scales");
  if (column_major) {
    EXPECT_EQ(scales.stride(0), 1) << "recv_x_scales must stay column-major";
    if (S > 1) {
      EXPECT_EQ(scales.stride(1), num_rows) << "recv_x_scales must be a transposed [S, rows] tensor";
    }
  } else {
    EXPECT_EQ(scales.stride(1), 1) << "recv_x_scales must stay row-major";
    EXPECT_EQ(scales.stride(0), S);
  }
  std::vector<float> expected;
  for (const ReceivedRow& row : rows)
    for (int s = 0; s < S; ++s) expected.push_back(all[row.source].scales[size_t(row.token) * S + s]);
  expect_matrix<float>(scales, expected, S, "recv_x_scales");
}

void expect_int32(const TensorView& t, const std::vector<int32_t>& expected, const char* what) {
  ASSERT_EQ(t.numel(), int64_t(expected.size())) << what;
  int reports = 0;
  for (size_t i = 0; i < expected.size() && reports < kMaxReports; ++i)
    if (t.data_as<const int32_t>()[i] != expected[i]) {
      ADD_FAILURE() << what << "[" << i << "]: expected " << expected[i] << ", got " << t.data_as<const int32_t>()[i];
      ++reports;
    }
}

// send_row[t][r]: the row of (rank, t) in r's reference receive list.
std::vector<int32_t> expected_send_rows(const NormalCase& c, const std::vector<RankInputs>& all, int rank) {
  std::vector<int32_t> rows(size_t(all[rank].num_tokens) * c.num_ranks, -1);
  for (int r = 0; r < c.num_ranks; ++r) {
    const ExpectedDispatch theirs = expected_dispatch(c, all, r, 1);
    for (size_t i = 0; i < theirs.rows.size(); ++i)
      if (theirs.rows[i].source == rank) rows[size_t(theirs.rows[i].token) * c.num_ranks + r] = int32_t(i);
  }
  return rows;
}

// The lead's rule: x_scales with stride(1) == 1 is row-major. A transposed [S, 1] (T = 1) is.
bool scales_column_major(const DispatchOptions& o, int num_tokens) { return o.column_major_scales && num_tokens != 1; }

const void* source_row(const NormalCase& c, const std::vector<RankInputs>& all, int source, int token) {
  return c.fp8 ? static_cast<const void*>(&all[source].x_fp8[size_t(token) * c.hidden])
               : static_cast<const void*>(&all[source].x[size_t(token) * c.hidden]);
}

// Cached dispatch of the fp8 inputs themselves (payload and strided scales) with the handle.
void cached_fp8_dispatch_and_check(Buffer& buffer, const NormalCase& c, const std::vector<RankInputs>& all, int rank,
                                   const DispatchOptions& o, const DispatchInputs& fresh,
                                   const DispatchHandle& handle) {
  DispatchInputs in;
  in.x = fresh.x;
  in.x_scales = fresh.x_scales;
  in.handle = &handle;
  PoisonAllocator poison;
  const DispatchResult result = buffer.dispatch(in, {.allocator = &poison});
  const ExpectedDispatch expected = expected_dispatch(c, all, rank, 1);
  expect_shape(result.recv_x, {handle.num_recv_tokens, c.hidden}, DType::kFloat8E4M3, "cached fp8 recv_x");
  expect_recv_rows(
      c, expected.rows, result.recv_x, [&](int s, int t) { return source_row(c, all, s, t); }, "cached fp8 recv_x");
  ASSERT_TRUE(result.recv_x_scales.has_value());
  expect_recv_scales(c, all, expected.rows, *result.recv_x_scales, handle.num_recv_tokens,
                     scales_column_major(o, all[rank].num_tokens));
}

// SPEC §3.6: with N > 1 nodes, the prefix sums of the rows received over source ranks and nodes.
void check_internode_handle(const NormalCase& c, const ExpectedDispatch& expected, const DispatchHandle& handle) {
  ASSERT_EQ(handle.recv_gbl_rank_prefix_sum.has_value(), c.num_nodes() > 1) << "recv_gbl_rank_prefix_sum";
  ASSERT_EQ(handle.recv_rdma_rank_prefix_sum.has_value(), c.num_nodes() > 1) << "recv_rdma_rank_prefix_sum";
  if (c.num_nodes() == 1) return;
  std::vector<int32_t> per_rank(c.num_ranks, 0), per_node(c.num_nodes(), 0);
  for (const ReceivedRow& row : expected.rows) {
    for (int s = row.source; s < c.num_ranks; ++s) per_rank[s] += 1;
    for (int n = row.source / c.node_size(); n < c.num_nodes(); ++n) per_node[n] += 1;
  }
  expect_shape(*handle.recv_gbl_rank_prefix_sum, {c.num_ranks}, DType::kInt32, "recv_gbl_rank_prefix_sum");
  expect_int32(*handle.recv_gbl_rank_prefix_sum, per_rank, "recv_gbl_rank_prefix_sum");
  expect_shape(*handle.recv_rdma_rank_prefix_sum, {c.num_nodes()}, DType::kInt32, "recv_rdma_rank_prefix_sum");
  expect_int32(*handle.recv_rdma_rank_prefix_sum, per_node, "recv_rdma_rank_prefix_sum");
}

void check_handle(const NormalCase& c, const std::vector<RankInputs>& all, int rank, int num_rows,
                  const ExpectedDispatch& expected, const DispatchHandle& handle) {
  const int R = c.num_ranks, T = all[rank].num_tokens;
  EXPECT_EQ(handle.num_ranks, R);
  EXPECT_EQ(handle.num_tokens, T);
  EXPECT_EQ(handle.num_recv_tokens, num_rows);
  expect_shape(handle.rank_prefix_matrix, {R, R}, DType::kInt32, "rank_prefix_matrix");
  expect_int32(handle.rank_prefix_matrix, expected.rank_prefix_matrix, "rank_prefix_matrix");
  expect_shape(handle.is_token_in_rank, {T, R}, DType::kBool, "handle.is_token_in_rank");
  const std::vector<uint8_t> in_rank = expected_layout(c, all[rank], 1).in_rank;
  EXPECT_TRUE(same_flags(handle.is_token_in_rank, in_rank)) << "handle.is_token_in_rank";
  expect_shape(handle.send_row, {T, R}, DType::kInt32, "handle.send_row");
  expect_int32(handle.send_row, expected_send_rows(c, all, rank), "handle.send_row");
  ASSERT_EQ(handle.recv_src_idx.numel(), num_rows);
  std::vector<int32_t> src_idx;
  for (const ReceivedRow& row : expected.rows) src_idx.push_back(row.token);
  TensorView real_rows = handle.recv_src_idx;
  real_rows.shape[0] = int64_t(src_idx.size());
  expect_int32(real_rows, src_idx, "handle.recv_src_idx");
  check_internode_handle(c, expected, handle);
}

// Rows past the real count (num_worst_tokens) carry no expert: idx -1, weight 0.
void expect_padding_rows(const DispatchResult& result, int num_real, int num_rows, int K) {
  for (int64_t i = num_real; i < num_rows; ++i)
    for (int k = 0; k < K; ++k) {
      ASSERT_EQ(element<int64_t>(*result.recv_topk_idx, i, k), -1) << "recv_topk_idx padding row " << i;
      if (result.recv_topk_weights) {
        ASSERT_EQ(element<float>(*result.recv_topk_weights, i, k), 0.0f) << "recv_topk_weights padding row " << i;
      }
    }
}

}  // namespace

BufferOptions cpu_buffer_options(int64_t num_nvl_bytes, std::chrono::milliseconds timeout) {
  BufferOptions options;
  options.backend = BackendKind::kCpu;
  options.num_nvl_bytes = num_nvl_bytes;
  options.timeout = timeout;
  return options;
}

int64_t small_nvl_bytes(const NormalCase& c) {
  // About 64 tokens of the largest record per dispatch round and 16 per combine round.
  const int64_t row = int64_t(c.hidden) * 2 + c.num_scales() * 4 + c.num_topk * 12 + c.num_ranks + 64;
  return std::max<int64_t>(int64_t(1) << 16, std::max(64 * row, 16 * c.num_ranks * row)) +
         4 * (c.num_ranks + c.num_experts) + 4096;
}

void prepare_call(RankCall& call, const NormalCase& c, const DispatchOptions& o, Buffer& buffer) {
  RankInputs& in = call.inputs = make_rank_inputs(c, buffer.rank());
  DispatchInputs& d = call.dispatch = DispatchInputs{};
  const int T = in.num_tokens, K = c.num_topk, S = c.num_scales();
  if (c.fp8) {
    d.x = view_of(in.x_fp8, DType::kFloat8E4M3, {T, c.hidden});
    if (o.column_major_scales) {
      call.scales_column_major.resize(in.scales.size());
      for (int t = 0; t < T; ++t)
        for (int s = 0; s < S; ++s) call.scales_column_major[size_t(s) * T + t] = in.scales[size_t(t) * S + s];
      d.x_scales = view_of(call.scales_column_major, DType::kFloat32, {S, T}).transposed(0, 1);
    } else {
      d.x_scales = view_of(in.scales, DType::kFloat32, {T, S});
    }
  } else {
    d.x = view_of(in.x, DType::kBFloat16, {T, c.hidden});
  }
  if (o.routing != RoutingInput::kFlagsOnly) {
    if (o.int32_topk) {
      call.topk_idx_int32.assign(in.topk_idx.begin(), in.topk_idx.end());
      d.topk_idx = view_of(call.topk_idx_int32, DType::kInt32, {T, K});
    } else {
      d.topk_idx = view_of(in.topk_idx, DType::kInt64, {T, K});
    }
    if (o.with_weights) d.topk_weights = view_of(in.topk_weights, DType::kFloat32, {T, K});
    d.num_experts = c.num_experts;
  }
  if (o.routing == RoutingInput::kFlagsOnly || o.routing == RoutingInput::kFlagsAndTopk)
    d.is_token_in_rank = view_of(in.route_flags, DType::kBool, {T, c.num_ranks});
  if (o.routing == RoutingInput::kWithLayout) {
    call.layout = buffer.get_dispatch_layout(*d.topk_idx, c.num_experts);
    d.num_tokens_per_rank = call.layout->num_tokens_per_rank;
    if (call.layout->num_tokens_per_rdma_rank) d.num_tokens_per_rdma_rank = *call.layout->num_tokens_per_rdma_rank;
    d.is_token_in_rank = call.layout->is_token_in_rank;
    d.num_tokens_per_expert = call.layout->num_tokens_per_expert;
  }
  d.expert_alignment = o.expert_alignment;
  d.num_worst_tokens = o.num_worst_tokens;
}

void check_dispatch(const NormalCase& c, const std::vector<RankInputs>& all, int rank, const DispatchOptions& o,
                    const DispatchResult& result) {
  const ExpectedDispatch expected = expected_dispatch(c, all, rank, o.expert_alignment);
  const int num_real = int(expected.rows.size());
  const int num_rows = o.num_worst_tokens > 0 ? o.num_worst_tokens : num_real;
  const int K = c.num_topk;

  expect_shape(result.recv_x, {num_rows, c.hidden}, c.fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, "recv_x");
  expect_recv_rows(
      c, expected.rows, result.recv_x, [&](int s, int t) { return source_row(c, all, s, t); }, "recv_x");
  EXPECT_EQ(result.recv_x_scales.has_value(), c.fp8);
  if (c.fp8 && result.recv_x_scales)
    expect_recv_scales(c, all, expected.rows, *result.recv_x_scales, num_rows,
                       scales_column_major(o, all[rank].num_tokens));

  const bool with_topk = o.routing != RoutingInput::kFlagsOnly;
  ASSERT_EQ(result.recv_topk_idx.has_value(), with_topk);
  ASSERT_EQ(result.recv_topk_weights.has_value(), with_topk && o.with_weights);
  if (with_topk) {
    expect_shape(*result.recv_topk_idx, {num_rows, K}, DType::kInt64, "recv_topk_idx");
    expect_matrix<int64_t>(*result.recv_topk_idx, expected.recv_topk_idx, K, "recv_topk_idx");
    if (o.with_weights) {
      expect_shape(*result.recv_topk_weights, {num_rows, K}, DType::kFloat32, "recv_topk_weights");
      expect_matrix<float>(*result.recv_topk_weights, expected.recv_topk_weights, K, "recv_topk_weights");
    }
    expect_padding_rows(result, num_real, num_rows, K);
  }
  if (o.num_worst_tokens > 0 || !with_topk) {
    EXPECT_TRUE(result.num_recv_tokens_per_expert.empty());
  } else {
    EXPECT_EQ(result.num_recv_tokens_per_expert, expected.per_expert);
  }

  ASSERT_NE(result.handle, nullptr);
  check_handle(c, all, rank, num_rows, expected, *result.handle);
  EXPECT_TRUE(result.event.query());
}

std::vector<uint16_t> expert_outputs(const NormalCase& c, const ExpectedDispatch& expected, int rank, int num_rows) {
  std::vector<uint16_t> y(size_t(num_rows) * c.hidden);
  Rng padding(seed_for(c.seed, rank, 99));
  for (int i = 0; i < num_rows; ++i) {
    const bool real = i < int(expected.rows.size());
    const std::vector<uint16_t> row =
        real ? expert_output_row(c, rank, expected.rows[i].source, expected.rows[i].token) : std::vector<uint16_t>();
    for (int h = 0; h < c.hidden; ++h) y[size_t(i) * c.hidden + h] = real ? row[h] : random_bf16(padding);
  }
  return y;
}

CombineResult combine_and_check(Buffer& buffer, const NormalCase& c, const std::vector<RankInputs>& all, int rank,
                                const DispatchResult& dispatched, int num_biases) {
  const DispatchHandle& handle = *dispatched.handle;
  const int T = all[rank].num_tokens, K = c.num_topk;
  std::vector<uint16_t> y = expert_outputs(c, expected_dispatch(c, all, rank, 1), rank, handle.num_recv_tokens);
  std::vector<uint16_t> biases[2];
  CombineInputs in;
  in.x = view_of(y, DType::kBFloat16, {handle.num_recv_tokens, c.hidden});
  in.handle = &handle;
  if (dispatched.recv_topk_weights) in.topk_weights = *dispatched.recv_topk_weights;
  for (int b = 0; b < num_biases; ++b) {
    for (int t = 0; t < T; ++t) {
      const std::vector<uint16_t> row = bias_row(c, rank, t, b);
      biases[b].insert(biases[b].end(), row.begin(), row.end());
    }
    (b == 0 ? in.bias_0 : in.bias_1) = view_of(biases[b], DType::kBFloat16, {T, c.hidden});
  }
  PoisonAllocator poison;
  CombineResult result = buffer.combine(in, {.allocator = &poison});

  expect_shape(result.combined_x, {T, c.hidden}, DType::kBFloat16, "combined_x");
  const std::vector<uint16_t> expected = expected_combined_x(c, all, rank, num_biases);
  int reports = 0;
  for (size_t i = 0; i < expected.size() && reports < kMaxReports; ++i)
    if (result.combined_x.data_as<const uint16_t>()[i] != expected[i]) {
      ADD_FAILURE() << "combined_x[" << i / c.hidden << ", " << i % c.hidden << "]: expected bf16 bits 0x" << std::hex
                    << expected[i] << ", got 0x" << result.combined_x.data_as<const uint16_t>()[i] << std::dec;
      ++reports;
    }
  EXPECT_EQ(result.combined_topk_weights.has_value(), dispatched.recv_topk_weights.has_value());
  if (result.combined_topk_weights) {
    expect_shape(*result.combined_topk_weights, {T, K}, DType::kFloat32, "combined_topk_weights");
    expect_matrix<float>(*result.combined_topk_weights, expected_combined_weights(c, all, rank), K,
                         "combined_topk_weights");
    if (all[rank].route_flags.empty()) {  // routed by topk_idx: the original weights come back
      std::vector<float> original = all[rank].topk_weights;
      for (size_t i = 0; i < original.size(); ++i)
        if (all[rank].topk_idx[i] == -1) original[i] = 0.0f;
      expect_matrix<float>(*result.combined_topk_weights, original, K, "combined_topk_weights vs original weights");
    }
  }
  EXPECT_TRUE(result.event.query());
  return result;
}

void cached_dispatch_and_check(Buffer& buffer, const NormalCase& c, const std::vector<RankInputs>& all, int rank,
                               const DispatchHandle& handle) {
  // Fresh values with the same routing: a copy of the earlier dispatch's rows would not match.
  auto values_of = [&](int r) {
    Rng rng(seed_for(c.seed, r, 42));
    return make_tagged_bf16(rng, r, all[r].num_tokens, c.hidden);
  };
  std::vector<std::vector<uint16_t>> z;
  for (int r = 0; r < c.num_ranks; ++r) z.push_back(values_of(r));
  DispatchInputs in;
  in.x = view_of(z[rank], DType::kBFloat16, {all[rank].num_tokens, c.hidden});
  in.handle = &handle;
  PoisonAllocator poison;
  const DispatchResult result = buffer.dispatch(in, {.allocator = &poison});

  const ExpectedDispatch expected = expected_dispatch(c, all, rank, 1);
  expect_shape(result.recv_x, {handle.num_recv_tokens, c.hidden}, DType::kBFloat16, "cached recv_x");
  expect_recv_rows(
      c, expected.rows, result.recv_x, [&](int s, int t) -> const void* { return &z[s][size_t(t) * c.hidden]; },
      "cached recv_x");
  EXPECT_FALSE(result.recv_x_scales || result.recv_topk_idx || result.recv_topk_weights);
  EXPECT_TRUE(result.num_recv_tokens_per_expert.empty());
  EXPECT_EQ(result.handle, nullptr);
}

void round_trip(Buffer& buffer, const NormalCase& c, const DispatchOptions& o, int num_biases) {
  const int rank = buffer.rank();
  const std::vector<RankInputs> all = make_all_inputs(c);
  RankCall call;
  prepare_call(call, c, o, buffer);
  PoisonAllocator poison;
  const DispatchResult dispatched = buffer.dispatch(call.dispatch, {.allocator = &poison});
  check_dispatch(c, all, rank, o, dispatched);
  combine_and_check(buffer, c, all, rank, dispatched, num_biases);
  cached_dispatch_and_check(buffer, c, all, rank, *dispatched.handle);
  if (c.fp8) cached_fp8_dispatch_and_check(buffer, c, all, rank, o, call.dispatch, *dispatched.handle);
}

bool same_bytes(const TensorView& a, const TensorView& b) {
  if (a.ndim != b.ndim || a.dtype != b.dtype) return false;
  for (int d = 0; d < a.ndim; ++d)
    if (a.shape[d] != b.shape[d]) return false;
  const size_t elem = dtype_size(a.dtype);
  const int64_t rows = a.ndim == 0 ? 1 : a.shape[0];
  const int64_t cols = a.ndim < 2 ? 1 : a.shape[1];
  auto at = [&](const TensorView& t, int64_t i, int64_t j) {
    const int64_t offset = (t.ndim > 0 ? i * t.strides[0] : 0) + (t.ndim > 1 ? j * t.strides[1] : 0);
    return static_cast<const std::byte*>(t.data) + offset * int64_t(elem);
  };
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      if (std::memcmp(at(a, i, j), at(b, i, j), elem) != 0) return false;
  return true;
}

bool same_flags(const TensorView& flags, const std::vector<uint8_t>& expected) {
  if (flags.numel() != int64_t(expected.size())) return false;
  return expected.empty() || std::memcmp(flags.data, expected.data(), expected.size()) == 0;
}

}  // namespace epcomm::testing
