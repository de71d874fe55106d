#include "core/timeout.hpp"

#include <cstdlib>
#include <string>

#include "core/check.hpp"

namespace epcomm {

std::chrono::milliseconds resolve_timeout(std::chrono::milliseconds requested) {
  if (requested.count() > 0) return requested;
  const char* env = std::getenv("EPCOMM_TIMEOUT_S");
  if (env == nullptr || *env == '\0') return kDefaultTimeout;
  char* end = nullptr;
  const double seconds = std::strtod(env, &end);
  if (end == env || *end != '\0' || !(seconds >= 0.001))
    throw_error(ErrorCode::kInvalidArgument,
                concat("EPCOMM_TIMEOUT_S: expected a number of seconds >= 0.001, got '", env, "'"));
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

}  // namespace epcomm
