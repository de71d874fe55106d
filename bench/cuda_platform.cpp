#include "cuda_platform.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "baseline.hpp"
#include "core/check.hpp"
#include "gpu_hold.cuh"
#include "kernel_clock.hpp"

namespace epcomm::bench {

void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    throw_error(ErrorCode::kInternal, concat("epcomm-bench: ", call, " failed: ", cudaGetErrorString(status)));
}

void check_nccl(ncclResult_t status, const char* call) {
  if (status != ncclSuccess)
    throw_error(ErrorCode::kInternal, concat("epcomm-bench: ", call, " failed: ", ncclGetErrorString(status)));
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: not an error for --backend auto
    return 0;
  }
  return count;
}

namespace {

// CUDA events around each section, recorded on the bench stream; read once at the end.
class CudaStopwatch final : public Stopwatch {
 public:
  CudaStopwatch(cudaStream_t stream, int iterations, int segments)
      : stream_(stream), segments_(segments), starts_(size_t(iterations) * segments), stops_(starts_.size()) {
    for (size_t i = 0; i < starts_.size(); ++i) {
      check_cuda(cudaEventCreate(&starts_[i]), "cudaEventCreate");
      check_cuda(cudaEventCreate(&stops_[i]), "cudaEventCreate");
    }
  }
  ~CudaStopwatch() override {
    for (size_t i = 0; i < starts_.size(); ++i) {
      cudaEventDestroy(starts_[i]);
      cudaEventDestroy(stops_[i]);
    }
  }
  void start(int iteration, int segment) override {
    check_cuda(cudaEventRecord(starts_[index(iteration, segment)], stream_), "cudaEventRecord");
  }
  void stop(int iteration, int segment) override {
    check_cuda(cudaEventRecord(stops_[index(iteration, segment)], stream_), "cudaEventRecord");
  }
  std::vector<double> microseconds(int segment) override {
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    std::vector<double> us;
    for (size_t i = segment; i < starts_.size(); i += segments_) {
      float ms = 0;
      check_cuda(cudaEventElapsedTime(&ms, starts_[i], stops_[i]), "cudaEventElapsedTime");
      us.push_back(double(ms) * 1e3);
    }
    return us;
  }

 private:
  size_t index(int iteration, int segment) const { return size_t(iteration) * segments_ + segment; }
  cudaStream_t stream_;
  int segments_;
  std::vector<cudaEvent_t> starts_, stops_;
};

}  // namespace

CudaPlatform::CudaPlatform(Bootstrap& bootstrap, int64_t flush_bytes) : bootstrap_(bootstrap) {
  const int count = cuda_device_count();
  require(count > 0, "epcomm-bench", "--backend cuda", "no CUDA device is visible");
  device_ = bootstrap.rank() % count;  // ranks of one host, one GPU each
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_), "cudaDeviceGetAttribute");
  check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  const int device = device_;
  allocator_ = std::make_unique<CachingAllocator>(
      [device](size_t bytes) -> void* {
        void* data = nullptr;
        check_cuda(cudaSetDevice(device), "cudaSetDevice");
        check_cuda(cudaMalloc(&data, bytes), "cudaMalloc");
        return data;
      },
      [](void* data) { cudaFree(data); });
  if (flush_bytes > 0) {
    // Larger than L2 whatever was asked, or the flush would not evict everything.
    int l2_bytes = 0;
    check_cuda(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device_), "cudaDeviceGetAttribute");
    flush_bytes_ = static_cast<size_t>(std::max<int64_t>(flush_bytes, int64_t(l2_bytes) * 2));
    check_cuda(cudaMalloc(&flush_buffer_, flush_bytes_), "cudaMalloc (L2 flush buffer)");
  }
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&align_word_), sizeof(float)), "cudaMalloc");
  check_cuda(cudaMemset(align_word_, 0, sizeof(float)), "cudaMemset");
  // NCCL refuses two ranks on one GPU: ranks that time-slice GPUs (more ranks than GPUs, for
  // correctness and kernel-time runs on small machines) line up through the bootstrap instead
  // and have no NCCL baseline.
  shares_gpus_ = bootstrap.size() > count;
  if (!shares_gpus_) init_nccl();
}

// NCCL's unique id travels through the bootstrap: rank 0 creates it, every rank takes rank 0's.
void CudaPlatform::init_nccl() {
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/1);  // never NVLink multicast (KINDS.md)
  ncclUniqueId id{};
  if (bootstrap_.rank() == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  std::vector<ncclUniqueId> ids(bootstrap_.size());
  bootstrap_.all_gather(&id, ids.data(), sizeof(id));
  check_nccl(ncclCommInitRank(&nccl_, bootstrap_.size(), ids[0], bootstrap_.rank()), "ncclCommInitRank");
}

CudaPlatform::~CudaPlatform() {
  cudaSetDevice(device_);
  cudaStreamSynchronize(stream_);
  if (nccl_ != nullptr) ncclCommDestroy(nccl_);
  cudaFree(flush_buffer_);
  cudaFree(align_word_);
  allocator_.reset();  // cached blocks go back when the last tensor does
  cudaStreamDestroy(stream_);
}

Tensor CudaPlatform::download(const TensorView& tensor) {
  synchronize();
  const size_t bytes = static_cast<size_t>(storage_extent(tensor)) * dtype_size(tensor.dtype);
  auto storage = std::make_shared<std::vector<std::byte>>(std::max<size_t>(bytes, 1));
  if (bytes > 0)
    check_cuda(cudaMemcpy(storage->data(), tensor.data, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (download)");
  TensorView view = tensor;
  view.data = storage->data();
  view.device = Device::cpu();
  return Tensor(view, std::shared_ptr<void>(storage, storage->data()));
}

void CudaPlatform::synchronize() { check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

void CudaPlatform::copy_to_device(void* dst, const void* src, size_t bytes) {
  check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (upload)");
  synchronize();
}

void CudaPlatform::copy_on_device(void* dst, const void* src, size_t bytes) {
  check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "cudaMemcpyAsync (clone)");
}

std::unique_ptr<Stopwatch> CudaPlatform::stopwatch(int iterations, int segments) {
  return std::make_unique<CudaStopwatch>(stream_, iterations, segments);
}

// Writing a buffer of twice the L2 size leaves none of the previous call's lines cached.
void CudaPlatform::flush_cache() {
  if (flush_buffer_ == nullptr) return;
  check_cuda(cudaMemsetAsync(flush_buffer_, static_cast<int>(++flush_count_ & 0xFF), flush_bytes_, stream_),
             "cudaMemsetAsync (L2 flush)");
}

// A one-element all-reduce on the stream: the next timed call starts on every GPU only once every
// rank has arrived, so no rank's figure includes waiting for a late peer. Then the GPU is held for
// kHoldNs (the same on every rank, so they stay aligned) while the host queues the timed call: the
// events then time the kernels, as BENCHMARKS.md asks, and not the host's launch path.
void CudaPlatform::align() {
  constexpr uint32_t kHoldNs = 20000;
  if (shares_gpus_) {  // no NCCL: the host waits for the stream, then for every rank
    synchronize();
    bootstrap_.barrier();
  } else {
    check_nccl(ncclAllReduce(align_word_, align_word_, 1, ncclFloat32, ncclSum, nccl_, stream_),
               "ncclAllReduce (align)");
  }
  launch_gpu_hold(kHoldNs, stream_);
  check_cuda(cudaGetLastError(), "hold kernel");
}

void CudaPlatform::empty_kernel() {
  launch_gpu_hold(0, stream_);
  check_cuda(cudaGetLastError(), "empty kernel");
}

std::string CudaPlatform::machine() const {
  cudaDeviceProp properties{};
  check_cuda(cudaGetDeviceProperties(&properties, device_), "cudaGetDeviceProperties");
  const std::string gpus = concat(cuda_device_count(), "x ", properties.name);
  return shares_gpus_ ? concat(gpus, " (", bootstrap_.size(), " ranks time-sliced)") : gpus;
}

KernelClock* CudaPlatform::kernels(std::string& why_not) { return kernel_clock(why_not); }

std::unique_ptr<Platform> make_cuda_platform(Bootstrap& bootstrap, int64_t flush_bytes) {
  return std::make_unique<CudaPlatform>(bootstrap, flush_bytes);
}

}  // namespace epcomm::bench
