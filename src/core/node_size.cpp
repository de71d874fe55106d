#include "core/node_size.hpp"

#include <algorithm>
#include <optional>

#include "core/environment.hpp"

namespace epcomm {

int resolve_ranks_per_node(int requested, int num_ranks) {
  if (requested != 0) return requested;  // negative values fail the range check of the Buffer
  for (const char* variable : {"EPCOMM_RANKS_PER_NODE", "LOCAL_WORLD_SIZE"})
    if (const std::optional<int64_t> value = env_int(variable))  // read and range-checked by the table
      return static_cast<int>(std::min<int64_t>(*value, num_ranks));
  return num_ranks;
}

}  // namespace epcomm
