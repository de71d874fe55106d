#include "traffic.hpp"

#include <algorithm>
#include <cstdio>
#include <numeric>

#include "core/check.hpp"

namespace epcomm::bench {
namespace {

bool sends_to_node(const Routing& routing, int src, int64_t token, int node, int ranks_per_node) {
  for (int r = node * ranks_per_node; r < (node + 1) * ranks_per_node; ++r)
    if (routing.sends_to(src, token, r)) return true;
  return false;
}

int64_t tokens_to_node(const Routing& routing, int src, int node, int ranks_per_node) {
  int64_t n = 0;
  for (int64_t t = 0; t < routing.tokens; ++t) n += sends_to_node(routing, src, t, node, ranks_per_node) ? 1 : 0;
  return n;
}

std::string megabytes(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f", double(bytes) / 1e6);
  return text;
}

}  // namespace

int64_t dispatch_bytes_per_token(int64_t x_bytes, int num_scales, int num_topk, bool with_weights, int num_ranks) {
  const int64_t record = x_bytes + int64_t(num_topk) * 8 + (with_weights ? int64_t(num_topk) * 4 : 0) +
                         int64_t(num_scales) * 4 + num_ranks;
  return 4 + (record + 15) / 16 * 16;
}

int64_t combine_bytes_per_row(int hidden, int num_topk) { return int64_t(hidden) * 2 + int64_t(num_topk) * 4; }

std::vector<int64_t> dispatch_minimum(const Routing& routing, int rank, int ranks_per_node, int64_t bytes_per_token) {
  const int num_nodes = routing.num_ranks / ranks_per_node;
  std::vector<int64_t> bytes(num_nodes, 0);
  for (int node = 0; node < num_nodes; ++node)
    if (node != rank / ranks_per_node)
      bytes[node] = tokens_to_node(routing, rank, node, ranks_per_node) * bytes_per_token;
  return bytes;
}

std::vector<int64_t> combine_minimum(const Routing& routing, int rank, int ranks_per_node, int64_t bytes_per_row) {
  const int num_nodes = routing.num_ranks / ranks_per_node, own = rank / ranks_per_node;
  std::vector<int64_t> bytes(num_nodes, 0);
  for (int node = 0; node < num_nodes; ++node)
    if (node != own)
      bytes[node] =
          tokens_to_node(routing, node * ranks_per_node + rank % ranks_per_node, own, ranks_per_node) * bytes_per_row;
  return bytes;
}

void report_traffic(BenchContext& ctx, const std::string& what, const std::vector<int64_t>& measured,
                    const std::vector<int64_t>& minimum) {
  const int64_t mine[2] = {std::accumulate(measured.begin(), measured.end(), int64_t(0)),
                           std::accumulate(minimum.begin(), minimum.end(), int64_t(0))};
  std::vector<int64_t> all(2 * size_t(ctx.ranks));
  ctx.platform.bootstrap().all_gather(mine, all.data(), sizeof(mine));
  std::vector<int64_t> sent;
  double worst_low = 1.0, worst_high = 1.0;
  bool exact = measured.size() == minimum.size();
  for (int r = 0; r < ctx.ranks; ++r) {
    sent.push_back(all[2 * r]);
    const double ratio = all[2 * r + 1] > 0 ? double(all[2 * r]) / double(all[2 * r + 1]) : (all[2 * r] == 0 ? 1 : 0);
    worst_low = std::min(worst_low, ratio);
    worst_high = std::max(worst_high, ratio);
    exact = exact && all[2 * r] == all[2 * r + 1];
  }
  std::sort(sent.begin(), sent.end());
  char ratios[64];
  std::snprintf(ratios, sizeof(ratios), "%.2f..%.2f", worst_low, worst_high);
  const std::string line =
      concat(what, ": network bytes per rank min/median/max ", megabytes(sent.front()), " / ",
             megabytes(sent[sent.size() / 2]), " / ", megabytes(sent.back()), " MB; ratio to the minimum of SPEC 3.6 ",
             ratios, exact ? " (every rank exactly at the minimum)" : " (NOT at the minimum)");
  if (ctx.rank == 0) ctx.report.note(line);
  progress(ctx, line);
  if (!exact) ++ctx.failures;
}

}  // namespace epcomm::bench
