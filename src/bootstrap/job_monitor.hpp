// JobMonitor: a rank's cheap question "has that peer process ended?", answered from the job-status
// page of epcomm-run (job_status.hpp). The CPU backend's bounded waits ask it now and then, so a
// peer that exits (even with code 0) while the others wait for it inside a collective is a
// peer failure they hear about at once, not at the timeout.
//
// Peers are named by what they publish in their own shared memory (JobIdentity), so a Buffer of a
// sub-group, whose ranks are not the job's, is looked up correctly. Without epcomm-run (MPI,
// torchrun) there is no monitor and the waits only have their timeout.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace epcomm {

// What a rank publishes where its peers can read it (the CPU backend: its sync block).
struct JobIdentity {
  std::atomic<uint64_t> token;    // the job's token; 0: not started by epcomm-run
  std::atomic<int64_t> job_rank;  // EPCOMM_RANK
};

class JobMonitor {
 public:
  // The monitor of this process's job (EPCOMM_JOB_STATUS_FD), opened once per process; nullptr
  // when the process was not started by epcomm-run (the variable or EPCOMM_RANK unset) or the page
  // cannot be read. Error(kInvalidArgument) naming the variable when either is malformed.
  static const JobMonitor* current();

  // Writes this process's identity into `slot` (zeros when there is no monitor).
  static void publish(JobIdentity& slot);

  // How the process that published `slot` ended ("exited with code 0", "exited: killed by signal
  // 9 (SIGKILL)"), or "" while it runs or when it is not of this job. A few loads: cheap enough
  // for a wait loop.
  std::string departure(const JobIdentity& slot) const;

  JobMonitor(const void* page, int job_rank) : page_(page), job_rank_(job_rank) {}

 private:
  const void* page_;
  int job_rank_;
};

}  // namespace epcomm
