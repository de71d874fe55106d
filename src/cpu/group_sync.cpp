#include "cpu/group_sync.hpp"

#include <algorithm>
#include <cstring>
#include <thread>

#include "core/check.hpp"
#include "core/timeout.hpp"

namespace epcomm::cpu {
namespace {

static_assert(sizeof(std::atomic<uint64_t>) == sizeof(uint64_t) && std::atomic<uint64_t>::is_always_lock_free,
              "counters in shared memory must be lock-free 64-bit words");

// Spin briefly, then yield, then sleep: ranks are processes that may outnumber the cores (CI has
// two), and a waiter that keeps spinning steals the time the late rank needs to arrive.
void pause(int& spins) {
  ++spins;
  if (spins > 1024) {
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  } else if (spins > 64) {
    std::this_thread::yield();
  }
}

}  // namespace

GroupSync::GroupSync(const PeerMemory& memory, int rank, std::chrono::milliseconds timeout)
    : memory_(memory),
      rank_(rank),
      timeout_(timeout),
      local_sequence_(kSyncChannels, 0),
      masked_(memory.num_ranks(), false),
      monitor_(JobMonitor::current()) {
  JobMonitor::publish(identity(rank_));
}

std::atomic<uint64_t>& GroupSync::counter(int rank, int channel) const {
  auto* counters = reinterpret_cast<std::atomic<uint64_t>*>(memory_.base(rank));
  return counters[channel * 8];  // one cache line per channel
}

std::atomic<uint64_t>& GroupSync::failed_flag(int rank) const {
  return *reinterpret_cast<std::atomic<uint64_t>*>(memory_.base(rank) + kFailedOffset);
}

void GroupSync::mark_failed(const std::string& cause) noexcept {
  if (failed_flag(rank_).load(std::memory_order_relaxed) != 0) return;
  char* text = reinterpret_cast<char*>(memory_.base(rank_) + kFailureTextOffset);
  const size_t length = std::min(cause.size(), kFailureTextBytes - 1);
  std::memcpy(text, cause.data(), length);
  text[length] = '\0';
  failed_flag(rank_).store(1, std::memory_order_release);
}

std::string GroupSync::failure_of(int rank) const {
  if (failed_flag(rank).load(std::memory_order_acquire) == 0) return "";
  const char* text = reinterpret_cast<const char*>(memory_.base(rank) + kFailureTextOffset);
  // The peer wrote a terminated string, but a reader never trusts it to have.
  return std::string(text, strnlen(text, kFailureTextBytes - 1));
}

bool failed_short_of(const std::atomic<uint64_t>& counter, const std::atomic<uint64_t>& failed_flag,
                     uint64_t sequence) {
  if (failed_flag.load(std::memory_order_acquire) == 0) return false;
  // The waiter read `counter` before this flag, and the peer may have arrived and failed between the
  // two reads. It stored its counter before its flag (both release, in that order) and never arrives
  // again, so after the flag's acquire this second read sees its last step.
  return counter.load(std::memory_order_acquire) < sequence;
}

void GroupSync::throw_if_failed(int peer, int channel, uint64_t sequence, const char* op) const {
  if (channel == kLifecycleChannel) return;  // destroy() of a failed Buffer still meets its peers
  if (!failed_short_of(counter(peer, channel), failed_flag(peer), sequence)) return;
  throw_error(ErrorCode::kPeerFailure, concat(op, ": rank ", rank_, " was waiting for rank ", peer,
                                              ", whose Buffer failed: ", failure_of(peer)));
}

JobIdentity& GroupSync::identity(int rank) const {
  return *reinterpret_cast<JobIdentity*>(memory_.base(rank) + kJobIdentityOffset);
}

// A peer that ended without arriving will never arrive: a peer failure now, not a timeout later.
// One that arrived and then left (after destroy()) is fine, hence the second look at its counter.
void GroupSync::throw_if_departed(int peer, int channel, uint64_t sequence, const char* op) const {
  if (monitor_ == nullptr) return;
  const std::string how = monitor_->departure(identity(peer));
  if (how.empty() || counter(peer, channel).load(std::memory_order_acquire) >= sequence) return;
  throw_error(ErrorCode::kPeerFailure, concat(op, ": rank ", peer, " ", how, " before it got here, while rank ", rank_,
                                              " waited for it (a rank must call Buffer::destroy() before it exits)"));
}

uint64_t GroupSync::arrive(int channel) {
  const uint64_t sequence = ++local_sequence_[channel];
  counter(rank_, channel).store(sequence, std::memory_order_release);
  return sequence;
}

std::chrono::nanoseconds GroupSync::wait_for(int peer, int channel, uint64_t sequence, const char* op) const {
  const auto start = std::chrono::steady_clock::now();
  const Deadline deadline(timeout_);
  int spins = 0;
  while (counter(peer, channel).load(std::memory_order_acquire) < sequence) {
    throw_if_failed(peer, channel, sequence, op);
    if (deadline.passed())
      throw_error(ErrorCode::kTimeout,
                  concat(op, ": rank ", rank_, " timed out after ", timeout_.count(), " ms waiting for rank ", peer));
    if (spins % 64 == 0) throw_if_departed(peer, channel, sequence, op);
    pause(spins);
  }
  return std::chrono::steady_clock::now() - start;
}

void GroupSync::barrier(int channel, const char* op) {
  const uint64_t sequence = arrive(channel);
  auto late_peers = [&] {
    std::vector<int> late;
    for (int peer = 0; peer < memory_.num_ranks(); ++peer)
      if (!masked_[peer] && counter(peer, channel).load(std::memory_order_acquire) < sequence) late.push_back(peer);
    return late;
  };
  const Deadline deadline(timeout_);
  int spins = 0;
  while (true) {
    const std::vector<int> late = late_peers();
    // Every peer arrived at this step, published its part of it, and only then can have failed (a
    // failed Buffer never arrives again): the step is complete, a failure is heard at the next wait.
    if (late.empty()) return;
    for (int peer : late) throw_if_failed(peer, channel, sequence, op);
    if (deadline.passed()) {
      std::string names;
      for (int peer : late_peers()) names += (names.empty() ? "" : ", ") + std::to_string(peer);
      if (names.empty()) return;  // they arrived just now
      throw_error(ErrorCode::kTimeout, concat(op, ": rank ", rank_, " timed out after ", timeout_.count(),
                                              " ms waiting for rank(s) ", names));
    }
    if (spins % 64 == 0)
      for (int peer : late_peers()) throw_if_departed(peer, channel, sequence, op);
    pause(spins);
  }
}

}  // namespace epcomm::cpu
