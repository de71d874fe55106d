// The CUDA platform of the bench: one GPU per rank. Only built with EPCOMM_HAS_CUDA and NCCL.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include "caching_allocator.hpp"
#include "cuda_errors.hpp"
#include "platform.hpp"

namespace epcomm::bench {

class CudaPlatform final : public Platform {
 public:
  CudaPlatform(Bootstrap& bootstrap, int64_t flush_bytes);
  ~CudaPlatform() override;

  BackendKind backend() const override { return BackendKind::kCuda; }
  Device device() const override { return Device::cuda(device_); }
  StreamHandle stream() const override { return stream_; }
  Allocator& allocator() override { return *allocator_; }
  Bootstrap& bootstrap() override { return bootstrap_; }

  Tensor download(const TensorView& tensor) override;
  void synchronize() override;
  std::unique_ptr<Stopwatch> stopwatch(int iterations, int segments) override;
  void flush_cache() override;
  void align() override;
  void empty_kernel() override;
  std::string machine() const override;
  KernelClock* kernels(std::string& why_not) override;

  ncclComm_t nccl() const { return nccl_; }  // nullptr when ranks share GPUs
  bool shares_gpus() const { return shares_gpus_; }
  cudaStream_t cuda_stream() const { return stream_; }
  int num_device_sms() const { return num_sms_; }

 protected:
  void copy_to_device(void* dst, const void* src, size_t bytes) override;
  void copy_on_device(void* dst, const void* src, size_t bytes) override;

 private:
  void init_nccl();

  Bootstrap& bootstrap_;
  int device_ = 0;
  int num_sms_ = 0;
  cudaStream_t stream_ = nullptr;
  ncclComm_t nccl_ = nullptr;
  bool shares_gpus_ = false;  // more ranks than visible GPUs
  void* flush_buffer_ = nullptr;
  size_t flush_bytes_ = 0;
  unsigned flush_count_ = 0;
  float* align_word_ = nullptr;
  std::unique_ptr<CachingAllocator> allocator_;
};

}  // namespace epcomm::bench
