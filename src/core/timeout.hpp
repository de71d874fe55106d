// The one timeout every wait for a peer obeys (SPEC §5).
#pragma once

#include <chrono>
#include <cstdint>

namespace epcomm {

constexpr std::chrono::milliseconds kDefaultTimeout{100'000};
// One year (the range of $EPCOMM_TIMEOUT_S, core/environment.cpp): every clock that adds a timeout
// stays far from overflow.
constexpr std::chrono::milliseconds kMaxTimeout{int64_t(365) * 24 * 3600 * 1000};

// `requested` if positive, else $EPCOMM_TIMEOUT_S (seconds, fractions allowed, 0.001 .. one year),
// else 100 s. A negative or longer `requested` is an Error(kInvalidArgument) naming `timeout`.
std::chrono::milliseconds resolve_timeout(std::chrono::milliseconds requested);

// A deadline on the steady clock, polled by spinning waits.
class Deadline {
 public:
  explicit Deadline(std::chrono::milliseconds timeout) : end_(std::chrono::steady_clock::now() + timeout) {}
  bool passed() const { return std::chrono::steady_clock::now() >= end_; }

 private:
  std::chrono::steady_clock::time_point end_;
};

}  // namespace epcomm
