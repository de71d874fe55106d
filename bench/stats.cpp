#include "stats.hpp"

#include <algorithm>

namespace epcomm::bench {

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  const size_t middle = values.size() / 2;
  std::nth_element(values.begin(), values.begin() + middle, values.end());
  const double upper = values[middle];
  if (values.size() % 2 == 1) return upper;
  const double lower = *std::max_element(values.begin(), values.begin() + middle);
  return (lower + upper) / 2;
}

std::vector<RankFigure> gather_figures(Bootstrap& bootstrap, const RankFigure& mine) {
  std::vector<RankFigure> all(bootstrap.size());
  bootstrap.all_gather(&mine, all.data(), sizeof(RankFigure));
  return all;
}

int max_over_ranks(Bootstrap& bootstrap, int value) {
  std::vector<int> all(bootstrap.size());
  bootstrap.all_gather(&value, all.data(), sizeof(int));
  return *std::max_element(all.begin(), all.end());
}

bool all_ranks_agree(Bootstrap& bootstrap, bool ok) { return max_over_ranks(bootstrap, ok ? 0 : 1) == 0; }

}  // namespace epcomm::bench
