// Bounded synchronisation between the ranks of the CPU backend, through counters in the shared
// segments. Each rank owns one counter per channel in its own segment and only it writes there;
// waiting means reading the peers' counters (acquire) until they reach a sequence number.
//
// Every rank performs the same sequence of steps per channel, so "step n of channel c" means the
// same point on every rank. A wait that does not complete within the timeout throws
// Error(kTimeout) naming the operation and the ranks that did not arrive; a peer that ended
// (epcomm-run's JobMonitor says so) without arriving throws Error(kPeerFailure) at once.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "bootstrap/job_monitor.hpp"
#include "cpu/shared_memory.hpp"

namespace epcomm::cpu {

constexpr int kSyncChannels = 16;
constexpr int kLifecycleChannel = 15;     // construction / destroy: waits there ignore failed peers
constexpr size_t kSyncBlockBytes = 4096;  // at the start of each rank's segment
// The sync block: | counters, one cache line per channel | ... | failed flag (at kFailedOffset) | its cause |
// | who this rank is in the job (kJobIdentityOffset, the last line, for JobMonitor) |
constexpr size_t kFailedOffset = 2048;
constexpr size_t kFailureTextOffset = kFailedOffset + 64;
constexpr size_t kJobIdentityOffset = kSyncBlockBytes - 64;
constexpr size_t kFailureTextBytes = kJobIdentityOffset - kFailureTextOffset;  // terminator included
static_assert(kSyncChannels * 64 <= kFailedOffset, "the counters and the failed flag must not overlap");

// Whether a peer whose counter is `counter` and whose failed flag is `failed_flag` failed before it
// reached step `sequence` (a wait for that step must then throw kPeerFailure). A peer that reached the
// step and failed after lets the step complete, even when the waiter saw its counter short of the step
// just before it saw the flag: the counter is read again after the flag.
bool failed_short_of(const std::atomic<uint64_t>& counter, const std::atomic<uint64_t>& failed_flag, uint64_t sequence);

class GroupSync {
 public:
  // `memory` must start every rank's segment with kSyncBlockBytes reserved for the counters.
  GroupSync(const PeerMemory& memory, int rank, std::chrono::milliseconds timeout);

  // Publishes the next step of `channel` for this rank; returns its sequence number.
  uint64_t arrive(int channel);
  // Waits until `peer` published step `sequence` of `channel`; returns how long it waited.
  std::chrono::nanoseconds wait_for(int peer, int channel, uint64_t sequence, const char* op) const;
  // arrive + wait for every unmasked peer. Throws Error(kTimeout) listing every late peer.
  void barrier(int channel, const char* op);
  // The step this rank published last on `channel`.
  uint64_t sequence(int channel) const { return local_sequence_[channel]; }

  // Publishes that this rank's Buffer failed (`cause`, truncated to fit). A wait for a rank that
  // failed, on any channel but kLifecycleChannel, throws Error(kPeerFailure) with its cause at once
  // instead of timing out; a step that the failed rank reached before it failed still completes.
  // Never throws.
  void mark_failed(const std::string& cause) noexcept;
  // The cause `rank` published, or "" while it has not failed.
  std::string failure_of(int rank) const;

  // Masked ranks are skipped by waits (enable_shrink); a timeout can mask instead of throwing.
  void set_masked(int rank, bool masked) { masked_[rank] = masked; }
  bool masked(int rank) const { return masked_[rank]; }

 private:
  std::atomic<uint64_t>& counter(int rank, int channel) const;
  std::atomic<uint64_t>& failed_flag(int rank) const;
  // Throws kPeerFailure when `peer` failed short of step `sequence` and `channel` is not the
  // lifecycle channel.
  void throw_if_failed(int peer, int channel, uint64_t sequence, const char* op) const;
  JobIdentity& identity(int rank) const;
  void throw_if_departed(int peer, int channel, uint64_t sequence, const char* op) const;

  const PeerMemory& memory_;
  int rank_;
  std::chrono::milliseconds timeout_;
  std::vector<uint64_t> local_sequence_;
  std::vector<bool> masked_;
  const JobMonitor* monitor_;  // nullptr when not started by epcomm-run
};

}  // namespace epcomm::cpu
