#include "modes.hpp"

namespace epcomm::bench {

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
  data.recv_tokens = static_cast<int64_t>(data.routing.normal_rows(ctx.rank).size());
  for (const int64_t e : data.topk_idx) data.selections += e >= 0 ? 1 : 0;
  return data;
}

}  // namespace epcomm::bench
