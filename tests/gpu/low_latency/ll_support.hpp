// Shared pieces of the low-latency GPU tests: cases, inputs generated the same way on every run,
// both backends driven with the same inputs, results copied to the host and compared bit for bit.
//
// Every rank uses GPU rank % device_count and builds a CPU Buffer (the reference) and a CUDA Buffer
// on the same Bootstrap. Inputs are random (never zeros) and encode (rank, token) in their first
// channels; GPU outputs are poisoned before the call.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "epcomm/buffer.hpp"

namespace epcomm::testing::ll {

enum class Format { kBf16, kFp8, kFp8RoundScale, kFp8Ue8m0 };
enum class Routing {
  kRandom,          // K distinct experts per token (repeats only when K > E)
  kGapsAndRepeats,  // about 20% empty slots (-1) and 15% slots repeating an earlier slot's expert
  kOneExpert,       // slot 0 of every token of every rank is the same expert
};

struct Case {
  int max_tokens = 128;  // T_max
  int tokens = 128;      // T on every rank
  int hidden = 7168;
  int topk = 8;
  int experts = 256;
  Format format = Format::kFp8;
  Routing routing = Routing::kRandom;
  bool hook = false;
  bool zero_copy = false;
  bool out = false;          // combine writes into a given (poisoned) tensor
  bool stats = false;        // pass both stats tensors
  bool int32_index = false;  // topk_idx as int32
  bool ragged = false;       // rank r has max(0, tokens - 5 r) tokens instead of `tokens`
  int tokens_of(int rank) const { return ragged ? std::max(0, tokens - 5 * rank) : tokens; }
  std::string name() const;
};

// Fails the test (throws) with the CUDA error text.
void cuda_check(cudaError_t status, const char* what);

// Device memory that frees itself.
struct DeviceMemory {
  std::shared_ptr<void> memory;
  void* get() const { return memory.get(); }
  static DeviceMemory allocate(size_t bytes);
};

// cudaMalloc'ed outputs filled with 0xA5 bytes.
class PoisonAllocator : public Allocator {
 public:
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) override;
};

// Hands out slices of one arena allocated up front: usable while a CUDA graph is being captured,
// and the same addresses on every replay. reset() starts over from the beginning.
class ArenaAllocator : public Allocator {
 public:
  explicit ArenaAllocator(size_t bytes);
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) override;
  void reset() { used_ = 0; }

 private:
  DeviceMemory arena_;
  size_t bytes_ = 0;
  size_t used_ = 0;
};

// Host copies of one rank's inputs.
struct Inputs {
  int tokens = 0;
  std::vector<uint16_t> x;      // [T, hidden] bf16
  std::vector<int64_t> topk;    // [T, K]
  std::vector<int32_t> topk32;  // the same as int32 (cases with int32_index)
  std::vector<float> weights;   // [T, K]
};
Inputs make_inputs(const Case& c, int rank, int num_ranks, uint64_t seed);

// Views of the inputs: on the host (vectors above) or copies on the GPU.
struct Views {
  int tokens = 0;
  TensorView x, topk, weights;
  std::vector<DeviceMemory> keep;
};
Views host_views(Inputs& in, const Case& c);
Views device_views(const Inputs& in, const Case& c, cudaStream_t stream);

// What the experts return: [L, R * T_max, hidden] bf16 on the host, only rows [0, recv_count[l])
// written (random values from the seed); the rest of the allocation is never touched.
struct ExpertOutputs {
  std::shared_ptr<uint16_t> data;
  std::vector<int32_t> counts;
  int64_t rows_per_expert = 0;
  int hidden = 0;
  TensorView host_view() const;
  // A device copy of the valid rows into `device` ([L, N, hidden] bf16, same layout).
  void copy_to_device(void* device, cudaStream_t stream) const;
};
ExpertOutputs make_expert_outputs(const Case& c, int num_ranks, const std::vector<int32_t>& counts, int rank,
                                  uint64_t seed);

// The "expert" of the CUDA-graph test, the same on host and device (ll_fake_expert.cu): odd experts
// flip the sign of their rows, even ones return them unchanged (exact in bf16).
inline uint16_t fake_expert_value(uint16_t value, int expert) { return expert % 2 ? uint16_t(value ^ 0x8000u) : value; }
// out[l][row] = fake expert of in[l][row] for row < counts[l] (device arrays, [L, N, hidden] bf16).
void launch_fake_expert(const uint16_t* in, uint16_t* out, const int32_t* counts, int num_local_experts,
                        int64_t rows_per_expert, int hidden, cudaStream_t stream);

// Keeps the GPU busy for `nanoseconds` (lets the host queue the timed work behind it).
void launch_gpu_sleep(uint64_t nanoseconds, cudaStream_t stream);

// What a dispatch returned, on the host, valid rows only.
struct DispatchOut {
  std::vector<int32_t> recv_count;             // [L]
  std::vector<int64_t> layout_range;           // [L * R]
  std::vector<std::vector<uint8_t>> rows;      // [L]: bytes of rows [0, count)
  std::vector<std::vector<uint32_t>> scales;   // [L]: per valid row, its scale words (f32 bits or packed)
  std::vector<std::vector<int32_t>> src_info;  // [L]
};
DispatchOut read_dispatch(const LowLatencyDispatchResult& result, const Case& c, int num_ranks);
std::vector<uint16_t> read_bf16(const TensorView& t);  // contiguous bf16 tensor, CPU or CUDA

// The fake expert applied on the host to a bf16 dispatch's rows.
ExpertOutputs fake_expert_outputs(const DispatchOut& dispatched, const Case& c, int num_ranks);

// gtest expectations; `what` prefixes every message. Return false on the first difference.
bool expect_same_dispatch(const DispatchOut& expected, const DispatchOut& actual, const std::string& what);
bool expect_same_bf16(const std::vector<uint16_t>& expected, const std::vector<uint16_t>& actual, int hidden,
                      const std::string& what);

// One side's calls (CPU reference or CUDA): dispatch, then combine of the experts' outputs.
struct Side {
  Buffer* buffer = nullptr;
  bool cuda = false;
  cudaStream_t stream = nullptr;
  Allocator* allocator = nullptr;  // CUDA outputs (default: a PoisonAllocator)
};
struct StatsViews {
  std::optional<TensorView> recv, wait;
};
LowLatencyDispatchResult dispatch(const Side& side, const Views& v, const Case& c, const StatsViews& stats = {});
// Combines `experts` (copied to the GPU, or into the zero-copy buffer when the case asks for it).
LowLatencyCombineResult combine(const Side& side, const Views& v, const Case& c, const LowLatencyHandle& handle,
                                const ExpertOutputs& experts, std::vector<DeviceMemory>& keep,
                                const std::optional<TensorView>& wait_stats = {});
// Runs the receive half now when the call returned a hook; waits for the stream on the GPU.
void finish(const Side& side, RecvHook& hook);

// Buffers of one rank: CPU reference and CUDA, sized for every case in `cases`.
struct Buffers {
  std::unique_ptr<Buffer> cpu;
  std::unique_ptr<Buffer> gpu;
  cudaStream_t stream = nullptr;
  int device = 0;
  PoisonAllocator poison;
  void destroy();
};
// `edit`, when given, changes the options of both Buffers last (e.g. ranks_per_node, the put path).
Buffers make_buffers(Bootstrap& group, const std::vector<Case>& cases, bool enable_shrink = false,
                     std::chrono::milliseconds timeout = std::chrono::milliseconds(0),
                     const std::function<void(BufferOptions&)>& edit = nullptr);

Side cpu_side(Buffers& b);
Side gpu_side(Buffers& b);

// Runs `c` on both buffers and compares dispatch and combine. Returns false on a difference.
bool check_case(Buffers& b, const Case& c, int rank, int num_ranks, uint64_t seed);

// Ranks to test: {2, 3, 4, 8} limited by $EPCOMM_TEST_MAX_RANKS (default 8) and by the GPUs present
// (one GPU per rank unless $EPCOMM_TEST_SHARE_GPUS=1). Safe in the parent process.
std::vector<int> rank_counts();
bool rank_count_runs_here(int num_ranks);
// cudaGetDeviceCount: for the ranks (children) only.
int visible_gpus();

}  // namespace epcomm::testing::ll
