#include "oracle.hpp"

#include <cmath>
#include <cstring>

#include "core/check.hpp"
#include "core/layouts.hpp"
#include "core/numerics.hpp"
#include "core/semantics.hpp"

namespace epcomm::bench {
namespace {

using numerics::bf16_to_float;

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

std::string hex(uint64_t value) { return concat("0x", std::hex, value); }

Mismatch shape_mismatch(const char* what, const TensorView& t, int64_t rows) {
  if (t.ndim >= 1 && t.size(0) == rows) return std::nullopt;
  return concat(what, ": expected ", rows, " rows, got shape ", t.shape_string());
}

}  // namespace

// ---- routing ----------------------------------------------------------------------------------

Routing Routing::gather(Bootstrap& bootstrap, const Workload& workload, const std::vector<int64_t>& mine) {
  Routing routing;
  routing.num_ranks = bootstrap.size();
  routing.tokens = workload.tokens;
  routing.topk = workload.topk;
  routing.experts = workload.experts;
  routing.local_experts = workload.experts / routing.num_ranks;
  routing.topk_idx_.resize(mine.size() * routing.num_ranks);
  bootstrap.all_gather(mine.data(), routing.topk_idx_.data(), mine.size() * sizeof(int64_t));
  return routing;
}

bool Routing::sends_to(int src, int64_t token, int dst) const {
  return semantics::token_goes_to_rank([&](int k) { return expert(src, token, k); }, topk, local_experts, dst);
}

int Routing::receivers(int src, int64_t token) const {
  int n = 0;
  for (int r = 0; r < num_ranks; ++r) n += sends_to(src, token, r) ? 1 : 0;
  return n;
}

std::vector<Source> Routing::normal_rows(int dst) const {
  std::vector<Source> rows;
  for (int src = 0; src < num_ranks; ++src)
    for (int64_t t = 0; t < tokens; ++t)
      if (sends_to(src, t, dst)) rows.push_back({src, t});
  return rows;
}

std::vector<Source> Routing::expert_rows(int e) const {
  std::vector<Source> rows;
  for (int src = 0; src < num_ranks; ++src) {
    for (int64_t t = 0; t < tokens; ++t)
      if (semantics::token_selects_expert([&](int k) { return expert(src, t, k); }, topk, e)) rows.push_back({src, t});
  }
  return rows;
}

// ---- normal mode ------------------------------------------------------------------------------

Mismatch Oracle::layout(Platform& platform, const LayoutResult& result) const {
  const Tensor per_rank = platform.download(result.num_tokens_per_rank);
  const Tensor per_expert = platform.download(result.num_tokens_per_expert);
  const Tensor in_rank = platform.download(result.is_token_in_rank);
  std::vector<int> rank_count(routing_.num_ranks, 0), expert_count(routing_.experts, 0);
  for (int64_t t = 0; t < w_.tokens; ++t) {
    for (int r = 0; r < routing_.num_ranks; ++r) {
      const bool expected = routing_.sends_to(me_, t, r);
      rank_count[r] += expected ? 1 : 0;
      if ((element<uint8_t>(in_rank, t, r) != 0) != expected)
        return concat("rank ", me_, ": layout: is_token_in_rank[", t, ", ", r, "] is ",
                      int(element<uint8_t>(in_rank, t, r)), ", expected ", int(expected));
    }
    for (int k = 0; k < w_.topk; ++k) {
      const int64_t e = routing_.expert(me_, t, k);
      if (semantics::names_expert(e)) ++expert_count[e];
    }
  }
  for (int r = 0; r < routing_.num_ranks; ++r)
    if (element<int32_t>(per_rank, r) != rank_count[r])
      return concat("rank ", me_, ": layout: num_tokens_per_rank[", r, "] is ", element<int32_t>(per_rank, r),
                    ", expected ", rank_count[r]);
  for (int e = 0; e < routing_.experts; ++e)
    if (element<int32_t>(per_expert, e) != expert_count[e])
      return concat("rank ", me_, ": layout: num_tokens_per_expert[", e, "] is ", element<int32_t>(per_expert, e),
                    ", expected ", expert_count[e]);
  return layout_per_node(platform, result);
}

Mismatch Oracle::layout_per_node(Platform& platform, const LayoutResult& result) const {
  const int G = ranks_per_node_ > 0 ? ranks_per_node_ : routing_.num_ranks, N = routing_.num_ranks / G;
  if (N == 1)
    return result.num_tokens_per_rdma_rank ? std::optional<std::string>(concat(
                                                 "rank ", me_, ": layout: num_tokens_per_rdma_rank given for one node"))
                                           : std::nullopt;
  if (!result.num_tokens_per_rdma_rank)
    return concat("rank ", me_, ": layout: no num_tokens_per_rdma_rank for ", N, " nodes");
  const Tensor per_node = platform.download(*result.num_tokens_per_rdma_rank);
  for (int n = 0; n < N; ++n) {
    int expected = 0;
    for (int64_t t = 0; t < w_.tokens; ++t)
      expected += semantics::token_goes_to_node([&](int r) { return routing_.sends_to(me_, t, r); }, n, G) ? 1 : 0;
    if (element<int32_t>(per_node, n) != expected)
      return concat("rank ", me_, ": layout: num_tokens_per_rdma_rank[", n, "] is ", element<int32_t>(per_node, n),
                    ", expected ", expected);
  }
  return std::nullopt;
}

Mismatch Oracle::normal_rows(const TensorView& recv_x, const std::optional<Tensor>& scales,
                             const std::vector<Source>& rows, bool fp8) const {
  std::vector<uint16_t> bf16(w_.hidden);
  std::vector<uint8_t> e4m3(w_.hidden);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Source s = rows[i];
    auto where = [&](int64_t h) {
      return concat("rank ", me_, ": recv_x[", i, ", ", h, "] (token ", s.token, " of rank ", s.rank, "): ");
    };
    if (fp8) {
      values_.fp8_row(s.rank, s.token, w_.hidden, e4m3.data());
      for (int h = 0; h < w_.hidden; ++h)
        if (element<uint8_t>(recv_x, i, h) != e4m3[h])
          return where(h) + concat("got ", hex(element<uint8_t>(recv_x, i, h)), ", expected ", hex(e4m3[h]));
      for (int g = 0; g < w_.hidden / kFp8GroupSize; ++g) {
        const float expected = values_.fp8_scale(s.rank, s.token, g);
        const float got = element<float>(*scales, i, g);
        if (bits_of(got) != bits_of(expected))
          return concat("rank ", me_, ": recv_x_scales[", i, ", ", g, "] (token ", s.token, " of rank ", s.rank,
                        "): got ", got, ", expected ", expected);
      }
    } else {
      values_.bf16_row(s.rank, s.token, w_.hidden, bf16.data());
      for (int h = 0; h < w_.hidden; ++h)
        if (element<uint16_t>(recv_x, i, h) != bf16[h])
          return where(h) + concat("got ", hex(element<uint16_t>(recv_x, i, h)), ", expected ", hex(bf16[h]));
    }
  }
  return std::nullopt;
}

Mismatch Oracle::normal_topk(Platform& platform, const DispatchResult& result, const std::vector<Source>& rows) const {
  if (!result.recv_topk_idx || !result.recv_topk_weights)
    return concat("rank ", me_, ": dispatch with topk_idx returned no recv_topk_idx / recv_topk_weights");
  const Tensor idx = platform.download(*result.recv_topk_idx);
  const Tensor weights = platform.download(*result.recv_topk_weights);
  if (Mismatch m = shape_mismatch("recv_topk_idx", idx, int64_t(rows.size()))) return m;
  const int L = routing_.local_experts;
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int k = 0; k < w_.topk; ++k) {
      const int64_t want_idx = semantics::local_expert(routing_.expert(rows[i].rank, rows[i].token, k), me_, L);
      const float want_w = semantics::local_weight(want_idx, values_.topk_weight(rows[i].rank, rows[i].token, k));
      if (element<int64_t>(idx, i, k) != want_idx || bits_of(element<float>(weights, i, k)) != bits_of(want_w))
        return concat("rank ", me_, ": recv_topk_idx/weights[", i, ", ", k, "] (token ", rows[i].token, " of rank ",
                      rows[i].rank, "): got (", element<int64_t>(idx, i, k), ", ", element<float>(weights, i, k),
                      "), expected (", want_idx, ", ", want_w, ")");
    }
  }
  return std::nullopt;
}

Mismatch Oracle::normal_counts(Platform& platform, const DispatchResult& result) const {
  const int L = routing_.local_experts, R = routing_.num_ranks;
  for (int l = 0; l < L; ++l) {
    const int expected = static_cast<int>(routing_.expert_rows(me_ * L + l).size());
    const int got = l < int(result.num_recv_tokens_per_expert.size()) ? result.num_recv_tokens_per_expert[l] : -1;
    if (got != expected)
      return concat("rank ", me_, ": num_recv_tokens_per_expert[", l, "] is ", got, ", expected ", expected);
  }
  const Tensor prefix = platform.download(result.handle->rank_prefix_matrix);
  const std::vector<int32_t> expected = semantics::rank_prefix_matrix(
      [&](int i, int j) {
        int sent = 0;
        for (int64_t t = 0; t < w_.tokens; ++t) sent += routing_.sends_to(i, t, j) ? 1 : 0;
        return sent;
      },
      R);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j)
      if (element<int32_t>(prefix, i, j) != expected[size_t(i) * R + j])
        return concat("rank ", me_, ": rank_prefix_matrix[", i, ", ", j, "] is ", element<int32_t>(prefix, i, j),
                      ", expected ", expected[size_t(i) * R + j]);
  return std::nullopt;
}

Mismatch Oracle::dispatch(Platform& platform, const DispatchResult& result, bool fp8, bool fresh) const {
  const std::vector<Source> rows = routing_.normal_rows(me_);
  const Tensor recv_x = platform.download(result.recv_x);
  if (Mismatch m = shape_mismatch("recv_x", recv_x, int64_t(rows.size()))) return concat("rank ", me_, ": ", *m);
  std::optional<Tensor> scales;
  if (fp8) {
    if (!result.recv_x_scales) return concat("rank ", me_, ": FP8 dispatch returned no recv_x_scales");
    scales = platform.download(*result.recv_x_scales);
    // The input scales are column-major, so the received ones must be too (lead's decision).
    if (rows.size() > 1 && scales->stride(0) != 1)
      return concat("rank ", me_,
                    ": recv_x_scales: expected column-major (stride(0) == 1) like x_scales, got strides [",
                    scales->stride(0), ", ", scales->stride(1), "]");
  }
  if (Mismatch m = normal_rows(recv_x, scales, rows, fp8)) return m;
  if (!fresh) return std::nullopt;
  if (!result.handle) return concat("rank ", me_, ": dispatch returned no handle");
  if (Mismatch m = normal_topk(platform, result, rows)) return m;
  return normal_counts(platform, result);
}

Mismatch Oracle::combine(Platform& platform, const CombineResult& result, bool with_weights) const {
  const Tensor out = platform.download(result.combined_x);
  if (Mismatch m = shape_mismatch("combined_x", out, w_.tokens)) return concat("rank ", me_, ": ", *m);
  const int R = routing_.num_ranks, G = ranks_per_node_ > 0 ? ranks_per_node_ : R;
  std::vector<uint16_t> x(w_.hidden), expected(w_.hidden), partial(w_.hidden);
  std::vector<float> acc(w_.hidden), node_acc(w_.hidden);
  for (int64_t t = 0; t < w_.tokens; ++t) {
    values_.bf16_row(me_, t, w_.hidden, x.data());
    // Every receiving rank sends the token back unchanged; no bias.
    auto row = [&](int r) { return routing_.sends_to(me_, t, r) ? x.data() : nullptr; };
    if (R / G == 1)
      semantics::one_level_combine(acc, R, row, nullptr, nullptr, expected.data());
    else
      semantics::two_level_combine(acc, node_acc, partial.data(), R / G, G, row, nullptr, nullptr, expected.data());
    for (int h = 0; h < w_.hidden; ++h)
      if (element<uint16_t>(out, t, h) != expected[h])
        return concat("rank ", me_, ": combined_x[", t, ", ", h, "] (sent to ", routing_.receivers(me_, t),
                      " ranks): got ", hex(element<uint16_t>(out, t, h)), ", expected ", hex(expected[h]));
  }
  if (!with_weights) return std::nullopt;
  if (!result.combined_topk_weights) return concat("rank ", me_, ": combine with topk_weights returned none");
  const Tensor weights = platform.download(*result.combined_topk_weights);
  for (int64_t t = 0; t < w_.tokens; ++t) {
    for (int k = 0; k < w_.topk; ++k) {
      const float expected = values_.topk_weight(me_, t, k);
      if (bits_of(element<float>(weights, t, k)) != bits_of(expected))
        return concat("rank ", me_, ": combined_topk_weights[", t, ", ", k, "]: got ", element<float>(weights, t, k),
                      ", expected ", expected);
    }
  }
  return std::nullopt;
}

// ---- low-latency mode -------------------------------------------------------------------------

Mismatch Oracle::expert_rows(Platform&, const LowLatencyDispatchResult&, const TensorView& recv_x,
                             const TensorView& scales, const TensorView& src_info, const TensorView& layout_range,
                             int local, int count, bool fp8) const {
  const std::vector<Source> rows = routing_.expert_rows(me_ * routing_.local_experts + local);
  if (count != int(rows.size()))
    return concat("rank ", me_, ": recv_count[", local, "] is ", count, ", expected ", rows.size());
  std::vector<uint16_t> x(w_.hidden);
  for (int i = 0; i < count; ++i) {
    const Source s = rows[i];
    const std::string where =
        concat("rank ", me_, ": expert ", local, " row ", i, " (token ", s.token, " of rank ", s.rank, "): ");
    if (element<int32_t>(src_info, local, i) != s.token)
      return where + concat("src_info is ", element<int32_t>(src_info, local, i));
    values_.bf16_row(s.rank, s.token, w_.hidden, x.data());
    for (int g = 0; g < w_.hidden / kFp8GroupSize; ++g) {
      const uint16_t* block = x.data() + g * kFp8GroupSize;
      const float scale = fp8 ? semantics::fp8_block_scale(block, kFp8GroupSize, /*round_scale=*/false) : 0.0f;
      if (fp8 && bits_of(element<float>(scales, local, i, g)) != bits_of(scale))
        return where + concat("scale ", g, " is ", element<float>(scales, local, i, g), ", expected ", scale);
      for (int c = 0; c < kFp8GroupSize; ++c) {
        const int h = g * kFp8GroupSize + c;
        const uint32_t got = fp8 ? element<uint8_t>(recv_x, local, i, h) : element<uint16_t>(recv_x, local, i, h);
        const uint32_t want = fp8 ? numerics::fp8_quantize(bf16_to_float(block[c]), scale) : block[c];
        if (got != want) return where + concat("column ", h, ": got ", hex(got), ", expected ", hex(want));
      }
    }
  }
  // layout_range[l][r] = (begin << 32) | count of the rows from rank r.
  int begin = 0;
  for (int r = 0; r < routing_.num_ranks; ++r) {
    int from_r = 0;
    for (const Source& s : rows) from_r += s.rank == r ? 1 : 0;
    const int64_t got = element<int64_t>(layout_range, local, r);
    const int64_t got_begin = semantics::layout_range_begin(got), got_count = semantics::layout_range_count(got);
    if (got_count != from_r || (from_r > 0 && got_begin != begin))
      return concat("rank ", me_, ": layout_range[", local, ", ", r, "] is (", got_begin, " << 32) | ", got_count,
                    ", expected (", begin, " << 32) | ", from_r);
    begin += from_r;
  }
  return std::nullopt;
}

Mismatch Oracle::low_latency_dispatch(Platform& platform, const LowLatencyDispatchResult& result, bool fp8) const {
  const Tensor recv_x = platform.download(result.recv_x);
  const Tensor counts = platform.download(result.recv_count);
  const Tensor src_info = platform.download(result.handle.src_info);
  const Tensor layout_range = platform.download(result.handle.layout_range);
  Tensor scales;
  if (fp8) {
    if (!result.recv_x_scales) return concat("rank ", me_, ": FP8 low_latency_dispatch returned no scales");
    scales = platform.download(*result.recv_x_scales);
  }
  for (int l = 0; l < routing_.local_experts; ++l) {
    if (Mismatch m =
            expert_rows(platform, result, recv_x, scales, src_info, layout_range, l, element<int32_t>(counts, l), fp8))
      return m;
  }
  return std::nullopt;
}

Mismatch Oracle::low_latency_combine(Platform& platform, const LowLatencyCombineResult& result) const {
  const Tensor out = platform.download(result.combined_x);
  if (Mismatch m = shape_mismatch("combined_x", out, w_.tokens)) return concat("rank ", me_, ": ", *m);
  std::vector<uint16_t> x(w_.hidden), expected(w_.hidden);
  std::vector<float> acc(w_.hidden);
  for (int64_t t = 0; t < w_.tokens; ++t) {
    values_.bf16_row(me_, t, w_.hidden, x.data());
    // Every expert returns the token unchanged: acc = fmaf(w[t,k], x[t], acc) over named slots, k ascending.
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int k = 0; k < w_.topk; ++k)
      if (semantics::names_expert(routing_.expert(me_, t, k)))
        semantics::add_weighted_bf16_row(acc, values_.topk_weight(me_, t, k), x.data());
    semantics::round_to_bf16(acc, expected.data());
    for (int h = 0; h < w_.hidden; ++h)
      if (element<uint16_t>(out, t, h) != expected[h])
        return concat("rank ", me_, ": low-latency combined_x[", t, ", ", h, "]: got ",
                      hex(element<uint16_t>(out, t, h)), ", expected ", hex(expected[h]));
  }
  return std::nullopt;
}

// ---- the NCCL baseline ------------------------------------------------------------------------

Mismatch Oracle::baseline_dispatch(Platform& platform, const TensorView& recv_x) const {
  const std::vector<Source> rows = routing_.normal_rows(me_);
  const Tensor host = platform.download(recv_x);
  if (Mismatch m = shape_mismatch("baseline recv_x", host, int64_t(rows.size()))) return concat("rank ", me_, ": ", *m);
  return normal_rows(host, std::nullopt, rows, /*fp8=*/false);
}

Mismatch Oracle::baseline_combine(Platform& platform, const TensorView& combined_x) const {
  const Tensor out = platform.download(combined_x);
  std::vector<uint16_t> x(w_.hidden);
  for (int64_t t = 0; t < w_.tokens; ++t) {
    const int n = routing_.receivers(me_, t);
    values_.bf16_row(me_, t, w_.hidden, x.data());
    for (int h = 0; h < w_.hidden; ++h) {
      // n bf16 atomic adds, each rounding a partial sum of at most n|x| by at most 2^-9 relative.
      const double exact = double(n) * bf16_to_float(x[h]);
      const double tolerance = double(n) * n * std::fabs(bf16_to_float(x[h])) * 0x1p-8;
      const double got = bf16_to_float(element<uint16_t>(out, t, h));
      if (!(std::fabs(got - exact) <= tolerance))
        return concat("rank ", me_, ": baseline combined_x[", t, ", ", h, "] (sent to ", n, " ranks): got ", got,
                      ", expected ", exact, " +- ", tolerance);
    }
  }
  return std::nullopt;
}

}  // namespace epcomm::bench
