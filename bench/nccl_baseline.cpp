#include <vector>

#include "baseline.hpp"
#include "baseline_kernels.cuh"
#include "core/check.hpp"
#include "cuda_platform.hpp"

namespace epcomm::bench {
namespace {

// Rows per peer and where they start in a packed buffer.
struct Splits {
  std::vector<int64_t> count, offset;
  int64_t total = 0;
  void set(const int32_t* counts, int ranks) {
    count.assign(counts, counts + ranks);
    offset.assign(ranks, 0);
    total = 0;
    for (int r = 0; r < ranks; ++r) {
      offset[r] = total;
      total += count[r];
    }
  }
};

class NcclBaseline final : public AllToAllBaseline {
 public:
  NcclBaseline(CudaPlatform& platform, const TensorView& x, const TensorView& topk_idx, int num_experts);
  ~NcclBaseline() override;

  void dispatch() override;
  void dispatch_cached() override;
  void combine() override;
  TensorView recv_x() const override { return rows_view(recv_rows_, recv_.total); }
  TensorView combined_x() const override { return rows_view(combined_, tokens_); }

 private:
  void* device_alloc(size_t bytes);
  TensorView rows_view(void* data, int64_t rows) const {
    return TensorView::contiguous(data, DType::kBFloat16, {rows, hidden_}, platform_.device());
  }
  // all_to_all_single(recv, send, recv_splits, send_splits): grouped sends and receives per peer.
  void all_to_all(const void* send, const Splits& send_splits, void* recv, const Splits& recv_splits);

  CudaPlatform& platform_;
  cudaStream_t stream_;
  TensorView x_, topk_idx_;
  int ranks_, tokens_, hidden_, local_experts_;
  int64_t row_bytes_;
  // Device memory, sized for the worst case (every token to every rank).
  int32_t* send_pos_ = nullptr;     // [R, T]
  int32_t* counts_ = nullptr;       // [2R]: tokens sent to each rank, then received from each
  int32_t* send_index_ = nullptr;   // [R * T]
  void* send_rows_ = nullptr;       // [R * T, hidden] bf16: packed by destination
  void* recv_rows_ = nullptr;       // [R * T, hidden] bf16: grouped by source
  void* back_rows_ = nullptr;       // [R * T, hidden] bf16: combine's returned rows, send order
  void* combined_ = nullptr;        // [T, hidden] bf16
  int32_t* host_counts_ = nullptr;  // pinned [2R]
  std::vector<void*> allocations_;
  Splits send_, recv_;
};

NcclBaseline::NcclBaseline(CudaPlatform& platform, const TensorView& x, const TensorView& topk_idx, int num_experts)
    : platform_(platform),
      stream_(platform.cuda_stream()),
      x_(x),
      topk_idx_(topk_idx),
      ranks_(platform.bootstrap().size()),
      tokens_(static_cast<int>(x.size(0))),
      hidden_(static_cast<int>(x.size(1))),
      local_experts_(num_experts / ranks_),
      row_bytes_(x.size(1) * 2) {
  require(x.dtype == DType::kBFloat16 && x.is_contiguous() && row_bytes_ % 16 == 0, "nccl baseline", "x",
          "expected contiguous bf16 [T, hidden] with hidden a multiple of 8");
  const size_t slots = size_t(ranks_) * tokens_;
  send_pos_ = static_cast<int32_t*>(device_alloc(slots * sizeof(int32_t)));
  counts_ = static_cast<int32_t*>(device_alloc(2 * ranks_ * sizeof(int32_t)));
  send_index_ = static_cast<int32_t*>(device_alloc(slots * sizeof(int32_t)));
  send_rows_ = device_alloc(slots * row_bytes_);
  recv_rows_ = device_alloc(slots * row_bytes_);
  back_rows_ = device_alloc(slots * row_bytes_);
  combined_ = device_alloc(size_t(tokens_) * row_bytes_);
  check_cuda(cudaMallocHost(reinterpret_cast<void**>(&host_counts_), 2 * ranks_ * sizeof(int32_t)), "cudaMallocHost");
}

NcclBaseline::~NcclBaseline() {
  cudaStreamSynchronize(stream_);
  for (void* data : allocations_) cudaFree(data);
  cudaFreeHost(host_counts_);
}

void* NcclBaseline::device_alloc(size_t bytes) {
  void* data = nullptr;
  check_cuda(cudaMalloc(&data, std::max<size_t>(bytes, 16)), "cudaMalloc (baseline)");
  allocations_.push_back(data);
  return data;
}

void NcclBaseline::all_to_all(const void* send, const Splits& send_splits, void* recv, const Splits& recv_splits) {
  const auto* send_bytes = static_cast<const char*>(send);
  auto* recv_bytes = static_cast<char*>(recv);
  check_nccl(ncclGroupStart(), "ncclGroupStart");
  for (int peer = 0; peer < ranks_; ++peer) {
    if (send_splits.count[peer] > 0)
      check_nccl(ncclSend(send_bytes + send_splits.offset[peer] * row_bytes_, size_t(send_splits.count[peer]) * hidden_,
                          ncclBfloat16, peer, platform_.nccl(), stream_),
                 "ncclSend");
    if (recv_splits.count[peer] > 0)
      check_nccl(ncclRecv(recv_bytes + recv_splits.offset[peer] * row_bytes_, size_t(recv_splits.count[peer]) * hidden_,
                          ncclBfloat16, peer, platform_.nccl(), stream_),
                 "ncclRecv");
  }
  check_nccl(ncclGroupEnd(), "ncclGroupEnd");
}

void NcclBaseline::dispatch() {
  // Routing: which tokens go where, in token order (a mask and a cumsum in PyTorch).
  launch_route({topk_idx_.data_as<int64_t>(), tokens_, static_cast<int>(topk_idx_.size(1)), local_experts_, ranks_,
                send_pos_, counts_},
               stream_);
  launch_send_index({send_pos_, counts_, tokens_, ranks_, send_index_}, stream_);
  // Exchange the counts (all_to_all_single of R ints), then wait for them on the host (.tolist()).
  check_nccl(ncclGroupStart(), "ncclGroupStart");
  for (int peer = 0; peer < ranks_; ++peer) {
    check_nccl(ncclSend(counts_ + peer, 1, ncclInt32, peer, platform_.nccl(), stream_), "ncclSend (counts)");
    check_nccl(ncclRecv(counts_ + ranks_ + peer, 1, ncclInt32, peer, platform_.nccl(), stream_), "ncclRecv (counts)");
  }
  check_nccl(ncclGroupEnd(), "ncclGroupEnd");
  check_cuda(cudaMemcpyAsync(host_counts_, counts_, 2 * ranks_ * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_),
             "cudaMemcpyAsync (counts)");
  check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (counts)");
  send_.set(host_counts_, ranks_);
  recv_.set(host_counts_ + ranks_, ranks_);
  dispatch_cached();
}

void NcclBaseline::dispatch_cached() {
  launch_index_select({x_.data, send_rows_, send_index_, send_.total, row_bytes_}, platform_.num_device_sms(), stream_);
  all_to_all(send_rows_, send_, recv_rows_, recv_);
}

void NcclBaseline::combine() {
  all_to_all(recv_rows_, recv_, back_rows_, send_);
  check_cuda(cudaMemsetAsync(combined_, 0, size_t(tokens_) * row_bytes_, stream_), "cudaMemsetAsync (zeros)");
  launch_index_add({back_rows_, combined_, send_index_, send_.total, hidden_}, platform_.num_device_sms(), stream_);
}

}  // namespace

std::unique_ptr<AllToAllBaseline> make_nccl_baseline(Platform& platform, const TensorView& x,
                                                     const TensorView& topk_idx, int num_experts) {
  auto* cuda = dynamic_cast<CudaPlatform*>(&platform);
  if (cuda == nullptr)
    throw_error(ErrorCode::kUnsupported, "epcomm-bench: the NCCL baseline runs on the CUDA backend only");
  if (cuda->shares_gpus())
    throw_error(ErrorCode::kUnsupported,
                "epcomm-bench: the NCCL baseline needs one GPU per rank (NCCL refuses two ranks on one GPU)");
  return std::make_unique<NcclBaseline>(*cuda, x, topk_idx, num_experts);
}

}  // namespace epcomm::bench
