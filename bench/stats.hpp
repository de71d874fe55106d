// Statistics of timed iterations and their gathering over ranks.
#pragma once

#include <vector>

#include "epcomm/bootstrap.hpp"

namespace epcomm::bench {

// The middle value (mean of the two middle ones for an even count). Empty input gives 0.
double median(std::vector<double> values);

// What one rank measured for one figure.
struct RankFigure {
  double median_us = 0;  // median over the timed iterations
  double bytes = -1;     // logical bytes of one call on this rank; < 0 when not defined
  double gbps() const { return bytes < 0 || median_us <= 0 ? -1 : bytes / median_us / 1e3; }
};

// Collective: every rank's figure, indexed by rank.
std::vector<RankFigure> gather_figures(Bootstrap& bootstrap, const RankFigure& mine);

// Collective: true on every rank iff `ok` is true on every rank.
bool all_ranks_agree(Bootstrap& bootstrap, bool ok);

// Collective: the largest `value` of any rank.
int max_over_ranks(Bootstrap& bootstrap, int value);

}  // namespace epcomm::bench
