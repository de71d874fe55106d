#include <algorithm>
#include <cmath>
#include <functional>

#include "core/check.hpp"
#include "modes.hpp"

namespace epcomm::bench {
namespace {

// One line that says how even the routing is: the share of all selections that go to the busiest
// 20% of experts (about 20% uniform, 80% skewed) and the spread of tokens received per rank.
std::string routing_summary(const Routing& routing) {
  std::vector<int64_t> per_expert(routing.experts, 0), per_rank(routing.num_ranks, 0);
  int64_t selections = 0;
  for (int src = 0; src < routing.num_ranks; ++src) {
    for (int64_t t = 0; t < routing.tokens; ++t) {
      for (int k = 0; k < routing.topk; ++k) {
        const int64_t e = routing.expert(src, t, k);
        if (e >= 0) ++per_expert[e], ++selections;
      }
      for (int dst = 0; dst < routing.num_ranks; ++dst) per_rank[dst] += routing.sends_to(src, t, dst) ? 1 : 0;
    }
  }
  std::sort(per_expert.begin(), per_expert.end(), std::greater<>());
  const size_t busiest = static_cast<size_t>(std::max(1L, std::lround(0.2 * routing.experts)));  // as many as are hot
  int64_t top = 0;
  for (size_t i = 0; i < busiest; ++i) top += per_expert[i];
  const auto [fewest, most] = std::minmax_element(per_rank.begin(), per_rank.end());
  const double percent = std::round(1000.0 * double(top) / double(std::max<int64_t>(selections, 1))) / 10;
  return concat("routing: ", percent, "% of selections on the busiest ", busiest, " experts; tokens received per rank ",
                *fewest, " .. ", *most);
}

}  // namespace

WorkloadData prepare_workload(BenchContext& ctx, const Workload& workload) {
  const Workload& w = workload;
  WorkloadData data{w, InputValues(ctx.options.seed), {}, {}, {}, {}};
  data.topk_idx = make_topk_idx(w, ctx.options.seed, ctx.rank);
  data.topk_weights.resize(data.topk_idx.size());
  for (int64_t t = 0; t < w.tokens; ++t)
    for (int k = 0; k < w.topk; ++k) data.topk_weights[t * w.topk + k] = data.values.topk_weight(ctx.rank, t, k);
  data.x_bf16.resize(size_t(w.tokens) * w.hidden);
  for (int64_t t = 0; t < w.tokens; ++t) data.values.bf16_row(ctx.rank, t, w.hidden, data.x_bf16.data() + t * w.hidden);
  data.routing = Routing::gather(ctx.platform.bootstrap(), w, data.topk_idx);
  if (ctx.rank == 0) progress(ctx, concat(w.label(), ": ", routing_summary(data.routing)));
  data.recv_tokens = static_cast<int64_t>(data.routing.normal_rows(ctx.rank).size());
  for (const int64_t e : data.topk_idx) data.selections += e >= 0 ? 1 : 0;
  return data;
}

}  // namespace epcomm::bench
