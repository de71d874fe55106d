// Where the bench's tensors live and how it takes time: the CPU (host memory, steady_clock) or one
// CUDA device per rank (device memory, CUDA events, an L2 flush and an NCCL barrier before each
// timed call). Everything the measurement code does goes through this interface.
#pragma once

#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/tensor.hpp"

namespace epcomm::bench {

class KernelClock;

// Start / stop marks of `segments` timed sections per iteration, for `iterations` iterations.
class Stopwatch {
 public:
  virtual ~Stopwatch() = default;
  virtual void start(int iteration, int segment) = 0;
  virtual void stop(int iteration, int segment) = 0;
  // Microseconds of `segment` in every iteration (waits for outstanding GPU work).
  virtual std::vector<double> microseconds(int segment) = 0;
};

// Start / stop marks that tag the calls in between for a KernelClock (no events): microseconds()
// gives each section's summed kernel durations, 0 for a section that launched no kernel.
class KernelStopwatch final : public Stopwatch {
 public:
  KernelStopwatch(KernelClock& clock, int iterations, int segments);
  void start(int iteration, int segment) override;
  void stop(int iteration, int segment) override;
  // Call once the GPU work of every iteration finished.
  std::vector<double> microseconds(int segment) override;
  // Whether every section of every iteration from `first_iteration` on launched a kernel.
  bool complete(int segment, int first_iteration);

 private:
  uint64_t tag(int iteration, int segment) const;
  void collect_once();
  KernelClock& clock_;
  int iterations_, segments_;
  uint64_t base_;
  bool collected_ = false;
  std::vector<double> us_;  // [iteration * segments + segment]
  std::vector<bool> seen_;
};

class Platform {
 public:
  virtual ~Platform() = default;

  virtual BackendKind backend() const = 0;
  virtual Device device() const = 0;
  virtual StreamHandle stream() const = 0;  // the caller stream every call runs on
  // Reuses freed blocks of the same size, so outputs of repeated calls cost no allocation.
  virtual Allocator& allocator() = 0;
  virtual Bootstrap& bootstrap() = 0;

  // A contiguous tensor on this platform's device, filled from host memory (`bytes` = its nbytes).
  Tensor upload(DType dtype, std::initializer_list<int64_t> shape, const void* host);
  // A host copy of `tensor` with the same shape and strides (waits for the stream first).
  virtual Tensor download(const TensorView& tensor) = 0;
  // A new contiguous tensor on this platform's device holding a copy of contiguous `tensor`.
  Tensor clone(const TensorView& tensor);
  virtual void synchronize() = 0;

  virtual std::unique_ptr<Stopwatch> stopwatch(int iterations, int segments) = 0;
  // Evicts the GPU L2 cache by writing a large buffer (no-op on the CPU).
  virtual void flush_cache() = 0;
  // Returns (GPU: the stream proceeds) once every rank has reached this point.
  virtual void align() = 0;
  // Queues a kernel that does nothing (CPU: nothing): timed like a call, it gives the floor of the
  // event timings.
  virtual void empty_kernel() = 0;
  // "8x NVIDIA H200" / "AMD EPYC 7B13 (2 cores)".
  virtual std::string machine() const = 0;
  // Kernel durations per call (kernel_clock.hpp), or nullptr with `why_not` (CPU: no kernels).
  virtual KernelClock* kernels(std::string& why_not) {
    why_not = "the CPU backend runs no kernels";
    return nullptr;
  }

 protected:
  virtual void copy_to_device(void* device_dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_on_device(void* device_dst, const void* device_src, size_t bytes) = 0;
};

std::unique_ptr<Platform> make_cpu_platform(Bootstrap& bootstrap);
// One GPU per rank (rank % visible devices); sets up NCCL through the bootstrap. Throws
// Error(kUnsupported) in a build without the CUDA parts of the bench.
std::unique_ptr<Platform> make_cuda_platform(Bootstrap& bootstrap, int64_t flush_bytes);
// Visible CUDA devices; 0 without CUDA (build or driver).
int cuda_device_count();

// Elements spanned by a strided view (what a copy of its memory must cover).
int64_t storage_extent(const TensorView& view);

// Element (i, j, ...) of a host tensor through its strides.
template <class T>
T element(const TensorView& view, int64_t i) {
  return static_cast<const T*>(view.data)[i * view.strides[0]];
}
template <class T>
T element(const TensorView& view, int64_t i, int64_t j) {
  return static_cast<const T*>(view.data)[i * view.strides[0] + j * view.strides[1]];
}
template <class T>
T element(const TensorView& view, int64_t i, int64_t j, int64_t k) {
  return static_cast<const T*>(view.data)[i * view.strides[0] + j * view.strides[1] + k * view.strides[2]];
}

}  // namespace epcomm::bench
