#include "core/node_size.hpp"

#include <algorithm>
#include <cstdlib>

#include "core/check.hpp"

namespace epcomm {

int resolve_ranks_per_node(int requested, int num_ranks) {
  if (requested != 0) return requested;  // negative values fail the range check of the Buffer
  for (const char* variable : {"EPCOMM_RANKS_PER_NODE", "LOCAL_WORLD_SIZE"}) {
    const char* value = std::getenv(variable);
    if (value == nullptr || *value == '\0') continue;
    char* end = nullptr;
    const long parsed = std::strtol(value, &end, 10);
    if (end == value || *end != '\0' || parsed < 1)
      throw_error(ErrorCode::kInvalidArgument,
                  concat("Buffer: ", variable, ": expected a positive number of ranks per node, got '", value, "'"));
    return static_cast<int>(std::min<long>(parsed, num_ranks));
  }
  return num_ranks;
}

}  // namespace epcomm
