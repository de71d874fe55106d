#include "bootstrap/job_monitor.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>

#include "bootstrap/job_status.hpp"
#include "core/environment.hpp"
#include "epcomm/error.hpp"

namespace epcomm {
namespace {

// Maps the page named by the environment read-only; nullptr when a variable is absent (not started
// by epcomm-run: MPI, torchrun) or the page cannot be read (a descriptor a child did not inherit).
// A malformed EPCOMM_JOB_STATUS_FD or EPCOMM_RANK is a broken launch: Error(kInvalidArgument) naming
// it (env_int), never a silent "no monitor". EPCOMM_RANK is read only when the descriptor is set.
const JobMonitor* open_from_env() {
  const std::optional<int64_t> fd_value = env_int(job_status::kFdVariable);
  if (!fd_value) return nullptr;
  const std::optional<int64_t> rank_value = env_int("EPCOMM_RANK");
  if (!rank_value) return nullptr;
  const int fd = static_cast<int>(*fd_value), rank = static_cast<int>(*rank_value);  // the table's ranges fit
  struct stat info {};
  if (::fstat(fd, &info) != 0 || info.st_size < static_cast<off_t>(job_status::kHeaderBytes)) return nullptr;
  void* page = ::mmap(nullptr, static_cast<size_t>(info.st_size), PROT_READ, MAP_SHARED, fd, 0);
  if (page == MAP_FAILED) return nullptr;
  const job_status::Header* h = job_status::header(page);
  const bool valid = h->magic == job_status::kMagic && h->token != 0 && rank < h->world_size &&
                     static_cast<size_t>(info.st_size) >= job_status::page_bytes(static_cast<int>(h->world_size));
  if (!valid) {
    ::munmap(page, static_cast<size_t>(info.st_size));
    return nullptr;
  }
  return new JobMonitor(page, rank);  // lives as long as the process
}

}  // namespace

const JobMonitor* JobMonitor::current() {
  // Per process: a rank forked from a test process that had asked before must open its own.
  static std::mutex mutex;
  static pid_t opened_in = -1;
  static const JobMonitor* monitor = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (opened_in != ::getpid()) {
    monitor = open_from_env();  // a throw leaves it unopened: every later call reports it again
    opened_in = ::getpid();
  }
  return monitor;
}

void JobMonitor::publish(JobIdentity& slot) {
  const JobMonitor* monitor = current();
  slot.job_rank.store(monitor ? monitor->job_rank_ : -1, std::memory_order_relaxed);
  slot.token.store(monitor ? job_status::header(monitor->page_)->token : 0, std::memory_order_release);
}

std::string JobMonitor::departure(const JobIdentity& slot) const {
  const job_status::Header* h = job_status::header(page_);
  if (slot.token.load(std::memory_order_acquire) != h->token) return "";  // another job, or none
  const int64_t rank = slot.job_rank.load(std::memory_order_relaxed);
  if (rank < 0 || rank >= h->world_size) return "";
  const job_status::Slot* s = job_status::slot(page_, static_cast<int>(rank));
  if (s->ended.load(std::memory_order_acquire) == 0) return "";
  return std::string(s->how, strnlen(s->how, job_status::kHowBytes));
}

}  // namespace epcomm
