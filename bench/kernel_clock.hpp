// Kernel time (BENCHMARKS.md "Kernel time and event time, both"): the durations of the kernels a
// call launched, from CUPTI activity records, summed per call. A call is tagged on the host: every
// CUDA API call this thread makes between begin(tag) and end() is linked to the tag (CUPTI external
// correlation), and so is every kernel it launched, on any stream. Built only with CUPTI; the CPU
// backend, and a build or a machine without CUPTI, have no kernel clock (no "kernel" rows).
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace epcomm::bench {

class KernelClock {
 public:
  virtual ~KernelClock() = default;
  // Tracing costs a little on every API call, so it is on only while kernel time is measured.
  virtual void enable() = 0;
  virtual void disable() = 0;
  virtual void begin(uint64_t tag) = 0;
  virtual void end() = 0;
  // Waits for every outstanding record (call after the GPU work finished); microseconds of kernel
  // time per tag recorded since the previous collect(). Tags without kernels are absent.
  virtual std::map<uint64_t, double> collect() = 0;
};

// The process's kernel clock, or nullptr (with `why_not` set) when CUPTI is unavailable.
KernelClock* kernel_clock(std::string& why_not);

}  // namespace epcomm::bench
