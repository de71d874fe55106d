// The CUPTI kernel clock: activity records of kernels (CONCURRENT_KERNEL) and the external
// correlation records that link each API call, and so each kernel, to the tag pushed around it.
#include <cupti.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernel_clock.hpp"

namespace epcomm::bench {
namespace {

constexpr CUpti_ExternalCorrelationKind kTagKind = CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM0;
constexpr size_t kRecordBufferBytes = size_t(8) << 20;

// What the CUPTI worker thread hands over; read under the mutex.
struct Records {
  std::mutex mutex;
  std::unordered_map<uint32_t, uint64_t> tag_of;  // correlation id -> tag
  struct Kernel {
    uint32_t correlation;
    uint64_t start_ns, end_ns;
  };
  std::vector<Kernel> kernels;
};

Records& records() {
  static Records instance;
  return instance;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kRecordBufferBytes));
  *size = *buffer != nullptr ? kRecordBufferBytes : 0;
  *max_records = 0;  // as many as fit
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid_bytes) {
  Records& r = records();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    CUpti_Activity* record = nullptr;
    while (cuptiActivityGetNextRecord(buffer, valid_bytes, &record) == CUPTI_SUCCESS) {
      if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
        const auto* kernel = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
        r.kernels.push_back({kernel->correlationId, kernel->start, kernel->end});
      } else if (record->kind == CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION) {
        const auto* link = reinterpret_cast<const CUpti_ActivityExternalCorrelation*>(record);
        if (link->externalKind == kTagKind) r.tag_of[link->correlationId] = link->externalId;
      }
    }
  }
  std::free(buffer);
}

// The API records exist only so that external correlation records are made for them.
constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_RUNTIME,
                                         CUPTI_ACTIVITY_KIND_DRIVER, CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION};

class CuptiClock final : public KernelClock {
 public:
  void enable() override {
    for (CUpti_ActivityKind kind : kKinds) cuptiActivityEnable(kind);
  }
  void disable() override {
    for (CUpti_ActivityKind kind : kKinds) cuptiActivityDisable(kind);
  }
  void begin(uint64_t tag) override { cuptiActivityPushExternalCorrelationId(kTagKind, tag); }
  void end() override {
    uint64_t last = 0;
    cuptiActivityPopExternalCorrelationId(kTagKind, &last);
  }
  std::map<uint64_t, double> collect() override {
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    Records& r = records();
    std::lock_guard<std::mutex> lock(r.mutex);
    std::map<uint64_t, double> us;
    for (const Records::Kernel& kernel : r.kernels) {
      const auto tag = r.tag_of.find(kernel.correlation);
      if (tag == r.tag_of.end() || kernel.end_ns < kernel.start_ns) continue;  // not launched inside a tagged call
      us[tag->second] += double(kernel.end_ns - kernel.start_ns) * 1e-3;
    }
    r.kernels.clear();
    r.tag_of.clear();
    return us;
  }
};

std::string describe(CUptiResult status) {
  const char* text = nullptr;
  cuptiGetResultString(status, &text);
  return text != nullptr ? text : "unknown CUPTI error";
}

}  // namespace

KernelClock* kernel_clock(std::string& why_not) {
  static std::string failure;
  static std::unique_ptr<CuptiClock> clock = []() -> std::unique_ptr<CuptiClock> {
    const char* off = std::getenv("EPCOMM_BENCH_NO_CUPTI");
    if (off != nullptr && *off != '\0' && *off != '0') {
      failure = "EPCOMM_BENCH_NO_CUPTI is set";
      return nullptr;
    }
    const CUptiResult status = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    if (status != CUPTI_SUCCESS) {
      failure = "CUPTI: cuptiActivityRegisterCallbacks failed: " + describe(status);
      return nullptr;
    }
    return std::make_unique<CuptiClock>();
  }();
  why_not = failure;
  return clock.get();
}

}  // namespace epcomm::bench
