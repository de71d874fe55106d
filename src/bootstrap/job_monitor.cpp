#include "bootstrap/job_monitor.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "bootstrap/job_status.hpp"
#include "core/environment.hpp"
#include "epcomm/error.hpp"

namespace epcomm {
namespace {

// A variable through the table (core/environment.cpp); false when absent, malformed or out of range.
bool read_int(const char* name, long min, long max, long& out) {
  std::optional<int64_t> value;
  try {
    value = env_int(name);
  } catch (const Error&) {
    return false;
  }
  if (!value || *value < min || *value > max) return false;
  out = static_cast<long>(*value);
  return true;
}

// Maps the page named by the environment read-only; nullptr when absent or malformed.
const JobMonitor* open_from_env() {
  long fd = -1, rank = -1;
  if (!read_int(job_status::kFdVariable, 0, INT_MAX, fd) || !read_int("EPCOMM_RANK", 0, INT_MAX, rank)) return nullptr;
  struct stat info {};
  if (::fstat(static_cast<int>(fd), &info) != 0 || info.st_size < static_cast<off_t>(job_status::kHeaderBytes))
    return nullptr;
  void* page = ::mmap(nullptr, static_cast<size_t>(info.st_size), PROT_READ, MAP_SHARED, static_cast<int>(fd), 0);
  if (page == MAP_FAILED) return nullptr;
  const job_status::Header* h = job_status::header(page);
  const bool valid = h->magic == job_status::kMagic && h->token != 0 && rank < h->world_size &&
                     static_cast<size_t>(info.st_size) >= job_status::page_bytes(static_cast<int>(h->world_size));
  if (!valid) {
    ::munmap(page, static_cast<size_t>(info.st_size));
    return nullptr;
  }
  return new JobMonitor(page, static_cast<int>(rank));  // lives as long as the process
}

}  // namespace

const JobMonitor* JobMonitor::current() {
  // Per process: a rank forked from a test process that had asked before must open its own.
  static std::mutex mutex;
  static pid_t opened_in = -1;
  static const JobMonitor* monitor = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (opened_in != ::getpid()) {
    opened_in = ::getpid();
    monitor = open_from_env();
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
