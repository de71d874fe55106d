// The CPU backend's use of the low-latency area (src/cpu/low_latency_exchange.hpp): for many sizes,
// every region is aligned, the regions do not overlap, and together they fit in exactly what
// get_low_latency_rdma_size_hint returns.
#include <gtest/gtest.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu/low_latency_exchange.hpp"
#include "epcomm/config.hpp"

namespace epcomm::cpu {
namespace {

TEST(LowLatencyRegions, AlignedDisjointAndWithinTheSizeHint) {
  int checked = 0;
  for (int num_ranks : {1, 2, 3, 5, 8, 16, 64})
    for (int local_experts : {1, 2, 3, 9, 32})
      for (int max_tokens : {1, 2, 7, 128, 1000})
        for (int hidden : {128, 384, 2048, 7168, 16384}) {
          const int num_experts = num_ranks * local_experts;
          SCOPED_TRACE(testing::Message()
                       << "R " << num_ranks << " E " << num_experts << " T_max " << max_tokens << " hidden " << hidden);
          const Regions r = Regions::for_sizes(max_tokens, hidden, num_ranks, num_experts);
          const int64_t slots = r.num_combine_slots();
          // Sorted by offset, each region ends before the next begins, and the last at the end.
          std::vector<std::pair<int64_t, int64_t>> regions = {
              {r.header, int64_t(sizeof(CallHeader))}, {r.dispatch_tokens, max_tokens * r.token_record_bytes()},
              {r.combine_routing, slots * 4},          {r.combine_tags, slots * 8},
              {r.combine_rows, slots * hidden * 2},
          };
          std::sort(regions.begin(), regions.end());
          for (size_t i = 0; i + 1 < regions.size(); ++i)
            EXPECT_LE(regions[i].first + regions[i].second, regions[i + 1].first) << "region at " << regions[i].first;
          EXPECT_LE(regions.back().first + regions.back().second, r.end);
          EXPECT_EQ(r.end, low_latency_buffer_size_hint(max_tokens, hidden, num_ranks, num_experts));
          // 16-byte alignment (from the area's start) for rows and records, 8 for the tags.
          for (int64_t offset : {r.dispatch_tokens, r.combine_routing, r.combine_rows})
            EXPECT_EQ(offset % 16, 0) << offset;
          EXPECT_EQ(r.combine_tags % 8, 0);
          EXPECT_EQ(r.token_record_bytes() % 16, 0);
          ++checked;
        }
  EXPECT_EQ(checked, 7 * 5 * 5 * 5);
}

}  // namespace
}  // namespace epcomm::cpu
