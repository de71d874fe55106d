#include "cuda/normal/normal_mode.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "core/check.hpp"
#include "core/cuda_check.hpp"
#include "cuda/normal/call_support.hpp"
#include "cuda/normal/launch.hpp"

namespace epcomm::cuda {

CallStreams::CallStreams(cudaStream_t comm, const StreamOptions& options, const OrderingEvents& events)
    : comm_(comm), options_(options), events_(events) {
  if (options.previous_event != nullptr) {
    options.previous_event->wait(reinterpret_cast<StreamHandle>(comm_));
  } else {
    EPCOMM_CUDA_CHECK(cudaEventRecord(events_.caller_ready, caller()));
    EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(comm_, events_.caller_ready, 0));
  }
}

Event CallStreams::finish() const {
  if (options_.async_finish) return Event::record(reinterpret_cast<StreamHandle>(comm_));
  EPCOMM_CUDA_CHECK(cudaEventRecord(events_.work_done, comm_));
  EPCOMM_CUDA_CHECK(cudaStreamWaitEvent(caller(), events_.work_done, 0));
  return Event();
}

void require_vector_aligned(const TensorView& tensor, const char* op, const char* arg) {
  if (tensor.numel() == 0) return;
  const auto address = reinterpret_cast<uintptr_t>(tensor.data);
  require(address % 16 == 0, op, arg, "data must start on a 16-byte boundary, got address 0x", std::hex, address,
          std::dec, " (offset ", address % 16, ")");
}

void fill_bytes(void* data, int value, size_t bytes, cudaStream_t stream) {
  if (bytes > 0) EPCOMM_CUDA_CHECK(cudaMemsetAsync(data, value, bytes, stream));
}

NormalMode::NormalMode(const CudaContext& ctx, NormalMemory* memory, uint64_t buffer_id)
    : ctx_(ctx), memory_(memory), buffer_id_(buffer_id) {
  EPCOMM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&state_), sizeof(LocalState)));
  EPCOMM_CUDA_CHECK(cudaMemset(state_, 0, sizeof(LocalState)));
  EPCOMM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_counts_), sizeof(HostCounts), cudaHostAllocMapped));
  std::memset(static_cast<void*>(host_counts_), 0, sizeof(HostCounts));
  EPCOMM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_counts_device_), host_counts_, 0));
  EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&events_.caller_ready, cudaEventDisableTiming));
  EPCOMM_CUDA_CHECK(cudaEventCreateWithFlags(&events_.work_done, cudaEventDisableTiming));
  EPCOMM_CUDA_CHECK(cudaDeviceSynchronize());
}

NormalMode::~NormalMode() {
  if (events_.caller_ready != nullptr) cudaEventDestroy(events_.caller_ready);
  if (events_.work_done != nullptr) cudaEventDestroy(events_.work_done);
  if (state_ != nullptr) cudaFree(state_);
  if (host_counts_ != nullptr) cudaFreeHost(host_counts_);
}

NormalCommon NormalMode::common_params(const Config& config, const RecordLayout& record, const char* op) const {
  const GroupGeometry& g = ctx_.geometry;

  NormalCommon c{};
  for (int r = 0; r < kMaxNvlRanks; ++r) c.peers[r] = memory_ != nullptr ? memory_->peer(r) : nullptr;
  c.rank = g.rank;
  c.num_ranks = g.num_ranks;
  c.record = record;
  c.queues.num_channels = config.num_sms / 2;
  c.queues.queue_tokens = config.num_max_nvl_chunked_recv_tokens;
  c.queues.record_bytes = record.bytes();
  c.chunk_tokens = std::min(config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens);
  c.timeout_ns = ctx_.timeout_ns();
  c.errors = ctx_.errors->sink();
  c.state = state_;

  const int64_t needed = c.queues.bytes_needed(g.num_ranks);
  const int64_t have = memory_ != nullptr ? memory_->bytes() : 0;
  if (needed > have)
    throw_error(
        ErrorCode::kOutOfCapacity,
        concat(op, ": num_nvl_bytes: the buffer has ", have, " bytes but this call needs ", needed, " (", g.num_ranks,
               " ranks x ", c.queues.num_channels, " channels x ", c.queues.queue_tokens, " tokens x ",
               c.queues.record_bytes, "-byte records + control); size it with Config.get_nvl_buffer_size_hint"));
  return c;
}

void NormalMode::wait_for_counts(int32_t sequence, const char* op) const {
  using Clock = std::chrono::steady_clock;
  // The kernels time out on their own after ctx_.timeout; the host allows for the time the notify
  // kernel may spend queued behind earlier work.
  const auto deadline = Clock::now() + 2 * ctx_.timeout + std::chrono::seconds(5);
  const volatile int32_t* ready = &host_counts_->ready;
  for (uint64_t polls = 1; *ready != sequence; ++polls) {
    if (ctx_.errors->is_timeout()) ctx_.errors->throw_if_set();
    if (polls % 4096 == 0) {
      const cudaError_t status = cudaStreamQuery(ctx_.comm_stream);
      if (status != cudaSuccess && status != cudaErrorNotReady) EPCOMM_CUDA_CHECK(status);
      if (Clock::now() > deadline)
        throw_error(ErrorCode::kTimeout,
                    concat(op, ": timed out waiting for the token counts of the peers (notify) after ",
                           std::chrono::duration_cast<std::chrono::seconds>(2 * ctx_.timeout).count() + 5, " s"));
      std::this_thread::yield();
    }
  }
  std::atomic_thread_fence(std::memory_order_acquire);
}

LayoutResult NormalMode::layout(const LayoutArgs& args, const StreamOptions& stream) {
  const GroupGeometry& g = ctx_.geometry;
  const int R = g.num_ranks, N = g.num_nodes(), T = args.num_tokens, E = args.num_experts;
  const Device device = ctx_.tensor_device();
  CallStreams streams(ctx_.comm_stream, stream, events_);
  const cudaStream_t comm = streams.comm();
  Allocator& allocator = stream.allocator != nullptr ? *stream.allocator : default_allocator();

  LayoutResult result;
  result.num_tokens_per_rank = allocate(allocator, DType::kInt32, {R}, device, streams.allocation_stream());
  if (N > 1)
    result.num_tokens_per_rdma_rank = allocate(allocator, DType::kInt32, {N}, device, streams.allocation_stream());
  result.num_tokens_per_expert = allocate(allocator, DType::kInt32, {E}, device, streams.allocation_stream());
  result.is_token_in_rank = allocate(allocator, DType::kBool, {T, R}, device, streams.allocation_stream());
  fill_bytes(result.num_tokens_per_rank.data, 0, sizeof(int32_t) * R, comm);
  if (N > 1) fill_bytes(result.num_tokens_per_rdma_rank->data, 0, sizeof(int32_t) * N, comm);
  fill_bytes(result.num_tokens_per_expert.data, 0, sizeof(int32_t) * E, comm);
  fill_bytes(result.is_token_in_rank.data, 0, size_t(T) * R, comm);

  if (T > 0) {
    RoutingParams p{};
    p.topk_idx = args.topk_idx.data;
    p.topk_is_int64 = args.topk_idx.dtype == DType::kInt64;
    p.num_topk = args.num_topk;
    p.num_tokens = T;
    p.num_ranks = R;
    p.num_experts = E;
    p.ranks_per_node = g.ranks_per_node;
    p.in_rank = result.is_token_in_rank.data_as<uint8_t>();
    p.rank_counts = result.num_tokens_per_rank.data_as<int32_t>();
    p.node_counts = N > 1 ? result.num_tokens_per_rdma_rank->data_as<int32_t>() : nullptr;
    p.expert_counts = result.num_tokens_per_expert.data_as<int32_t>();
    p.errors = ctx_.errors->sink();
    p.phase = DevicePhase::kLayout;
    const int tokens_per_block = 8 * kRoutingThreads / 32 * (32 / args.num_topk);  // 8 rounds of every warp
    const int blocks = std::clamp((T + tokens_per_block - 1) / tokens_per_block, 1, default_num_sms());
    launch_routing(p, blocks, comm);
  }
  result.event = streams.finish();
  return result;
}

}  // namespace epcomm::cuda
