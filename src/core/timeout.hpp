// The one timeout every wait for a peer obeys (SPEC §5).
#pragma once

#include <chrono>
#include <cstdint>

namespace epcomm {

constexpr std::chrono::milliseconds kDefaultTimeout{100'000};

// `requested` if positive, else $EPCOMM_TIMEOUT_S (seconds, fractions allowed, >= 0.001), else 100 s.
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
