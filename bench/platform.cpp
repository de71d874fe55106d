#include "platform.hpp"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>

#include "caching_allocator.hpp"
#include "core/check.hpp"
#include "kernel_clock.hpp"

namespace epcomm::bench {

KernelStopwatch::KernelStopwatch(KernelClock& clock, int iterations, int segments)
    : clock_(clock),
      iterations_(iterations),
      segments_(segments),
      us_(size_t(iterations) * segments, 0.0),
      seen_(us_.size(), false) {
  static uint64_t next_base = 1;  // tags of different stopwatches never collide
  base_ = next_base;
  next_base += us_.size() + 1;
}

uint64_t KernelStopwatch::tag(int iteration, int segment) const {
  return base_ + uint64_t(iteration) * segments_ + segment;
}

void KernelStopwatch::start(int iteration, int segment) { clock_.begin(tag(iteration, segment)); }
void KernelStopwatch::stop(int, int) { clock_.end(); }

void KernelStopwatch::collect_once() {
  if (collected_) return;
  collected_ = true;
  for (const auto& [tag, us] : clock_.collect()) {
    if (tag < base_ || tag >= base_ + us_.size()) continue;
    us_[tag - base_] = us;
    seen_[tag - base_] = true;
  }
}

std::vector<double> KernelStopwatch::microseconds(int segment) {
  collect_once();
  std::vector<double> us;
  for (int i = 0; i < iterations_; ++i) us.push_back(us_[size_t(i) * segments_ + segment]);
  return us;
}

bool KernelStopwatch::complete(int segment, int first_iteration) {
  collect_once();
  for (int i = first_iteration; i < iterations_; ++i)
    if (!seen_[size_t(i) * segments_ + segment]) return false;
  return true;
}

int64_t storage_extent(const TensorView& view) {
  if (view.numel() == 0) return 0;
  int64_t last = 0;
  for (int d = 0; d < view.ndim; ++d) last += (view.shape[d] - 1) * view.strides[d];
  return last + 1;
}

Tensor Platform::upload(DType dtype, std::initializer_list<int64_t> shape, const void* host) {
  const std::vector<int64_t> dims(shape);
  Tensor tensor = allocator().allocate(dtype, dims, device(), stream());
  copy_to_device(tensor.data, host, tensor.nbytes());
  return tensor;
}

Tensor Platform::clone(const TensorView& tensor) {
  require(tensor.is_contiguous(), "epcomm-bench", "clone", "expects a contiguous tensor");
  const std::vector<int64_t> shape(tensor.shape.begin(), tensor.shape.begin() + tensor.ndim);
  Tensor copy = allocator().allocate(tensor.dtype, shape, device(), stream());
  copy_on_device(copy.data, tensor.data, tensor.nbytes());
  return copy;
}

namespace {

class CpuStopwatch final : public Stopwatch {
 public:
  CpuStopwatch(int iterations, int segments)
      : segments_(segments), starts_(size_t(iterations) * segments), stops_(size_t(iterations) * segments) {}
  void start(int iteration, int segment) override { starts_[index(iteration, segment)] = Clock::now(); }
  void stop(int iteration, int segment) override { stops_[index(iteration, segment)] = Clock::now(); }
  std::vector<double> microseconds(int segment) override {
    std::vector<double> us;
    for (size_t i = segment; i < starts_.size(); i += segments_)
      us.push_back(std::chrono::duration<double, std::micro>(stops_[i] - starts_[i]).count());
    return us;
  }

 private:
  using Clock = std::chrono::steady_clock;
  size_t index(int iteration, int segment) const { return size_t(iteration) * segments_ + segment; }
  int segments_;
  std::vector<Clock::time_point> starts_, stops_;
};

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  }
  return "unknown CPU";
}

// CPU backend: host memory, synchronous calls, steady_clock, a bootstrap barrier to line ranks up.
class CpuPlatform final : public Platform {
 public:
  explicit CpuPlatform(Bootstrap& bootstrap)
      : bootstrap_(bootstrap),
        allocator_([](size_t bytes) { return std::aligned_alloc(64, (bytes + 63) / 64 * 64); },
                   [](void* data) { std::free(data); }) {}

  BackendKind backend() const override { return BackendKind::kCpu; }
  Device device() const override { return Device::cpu(); }
  StreamHandle stream() const override { return nullptr; }
  Allocator& allocator() override { return allocator_; }
  Bootstrap& bootstrap() override { return bootstrap_; }

  Tensor download(const TensorView& tensor) override {
    const size_t bytes = static_cast<size_t>(storage_extent(tensor)) * dtype_size(tensor.dtype);
    auto storage = std::make_shared<std::vector<std::byte>>(std::max<size_t>(bytes, 1));
    if (bytes > 0) std::memcpy(storage->data(), tensor.data, bytes);
    TensorView view = tensor;
    view.data = storage->data();
    return Tensor(view, std::shared_ptr<void>(storage, storage->data()));
  }
  void synchronize() override {}

  std::unique_ptr<Stopwatch> stopwatch(int iterations, int segments) override {
    return std::make_unique<CpuStopwatch>(iterations, segments);
  }
  // The CPU figures are for checking the bench end to end, not for comparison: caches stay warm.
  void flush_cache() override {}
  void align() override { bootstrap_.barrier(); }
  void empty_kernel() override {}
  std::string machine() const override {
    return concat(cpu_model(), " (", std::thread::hardware_concurrency(), " cores)");
  }

 protected:
  void copy_to_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy_on_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }

 private:
  Bootstrap& bootstrap_;
  CachingAllocator allocator_;
};

}  // namespace

std::unique_ptr<Platform> make_cpu_platform(Bootstrap& bootstrap) { return std::make_unique<CpuPlatform>(bootstrap); }

}  // namespace epcomm::bench
