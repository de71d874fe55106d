#include "core/timeout.hpp"

#include "core/check.hpp"
#include "core/environment.hpp"

namespace epcomm {

std::chrono::milliseconds resolve_timeout(std::chrono::milliseconds requested) {
  require(requested.count() >= 0, "Buffer", "timeout", "expected >= 0 ms (0 = $EPCOMM_TIMEOUT_S, else ",
          kDefaultTimeout.count() / 1000, " s), got ", requested.count(), " ms");
  require(requested <= kMaxTimeout, "Buffer", "timeout", "expected at most ", kMaxTimeout.count(), " ms, got ",
          requested.count(), " ms");
  if (requested.count() > 0) return requested;
  const std::optional<double> seconds = env_seconds("EPCOMM_TIMEOUT_S");
  if (!seconds) return kDefaultTimeout;
  return std::chrono::milliseconds(static_cast<int64_t>(*seconds * 1000.0));
}

}  // namespace epcomm
