// Shared pieces of the high-throughput GPU tests: every rank runs the same call on a CPU Buffer (the
// reference) and a CUDA Buffer built on the same Bootstrap, with the same fresh random inputs, and
// the results must match bit for bit.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "epcomm/epcomm.hpp"

namespace epcomm::testing::normal {

#define EPCOMM_TEST_CUDA(call)                                                                               \
  do {                                                                                                       \
    const cudaError_t epcomm_test_status_ = (call);                                                          \
    ASSERT_EQ(epcomm_test_status_, cudaSuccess) << #call << ": " << cudaGetErrorString(epcomm_test_status_); \
  } while (0)

// Rank counts the tests run: {2, 3, 4, 8} up to $EPCOMM_TEST_MAX_RANKS (default 8).
std::vector<int> rank_counts();
// Ranks drive GPU rank % (visible GPUs): several ranks share a GPU when there are fewer GPUs.
int select_device(int rank);
// Sets a short timeout (seconds) for the tests that expect one; the default run keeps 100 s.
std::chrono::milliseconds test_timeout();

// Allocator that fills every output with a pattern (0xA5 bytes) before the backend writes it, so an
// element the backend forgot to write cannot match by luck. CUDA memory is filled on the given stream
// and synchronised, so the fill is complete before the call goes on.
class PoisonAllocator final : public Allocator {
 public:
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) override;
};

// Bump allocator over one preallocated CUDA block, for CUDA-graph capture (no cudaMalloc while
// capturing, and the addresses stay valid for every replay). poison() fills the whole block.
class ArenaAllocator final : public Allocator {
 public:
  ArenaAllocator(int device, size_t bytes);
  ~ArenaAllocator() override;
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) override;
  void poison();
  void reset() { used_ = 0; }

 private:
  int device_;
  char* base_ = nullptr;
  size_t bytes_ = 0;
  size_t used_ = 0;
};

// The logical contents of a 1-D or 2-D tensor (any strides, CPU or CUDA) in row-major order, as raw
// bytes (element size per entry).
std::vector<uint8_t> contents(const TensorView& tensor);
template <class T>
std::vector<T> values(const TensorView& tensor) {
  const std::vector<uint8_t> bytes = contents(tensor);
  std::vector<T> out(bytes.size() / sizeof(T));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

// Expects the first `rows` rows (all when -1) of two tensors of the same shape to hold the same bytes;
// reports the first differing element with both values.
void expect_same_rows(const std::string& what, const TensorView& cpu, const TensorView& gpu, int64_t rows = -1);

// Device memory holding a copy of host data, freed with the object.
class DeviceCopy {
 public:
  DeviceCopy() = default;
  DeviceCopy(const void* data, size_t bytes);
  ~DeviceCopy();
  DeviceCopy(DeviceCopy&& other) noexcept;
  DeviceCopy& operator=(DeviceCopy&& other) noexcept;
  void* data() const { return data_; }
  // Overwrites the contents (same size).
  void write(const void* data, size_t bytes);

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

enum class Routing { kUniform, kSkewed };

// One dispatch + combine scenario.
struct Case {
  std::string name;
  int num_tokens = 96;  // T on every rank (see empty_rank)
  int hidden = 256;
  int num_topk = 4;          // K
  int experts_per_rank = 4;  // L
  bool fp8 = false;
  bool scales_column_major = false;
  int num_scales = 0;  // fp8: S (0: hidden / 128)
  bool int32_idx = false;
  bool with_weights = true;
  double empty_slot_fraction = 0.1;  // topk slots set to -1
  Routing routing = Routing::kUniform;
  int expert_alignment = 1;
  int num_worst_tokens = 0;       // 0: exact sizes
  int empty_rank = -1;            // this rank has T = 0
  int num_bias = 0;               // combine bias tensors (0, 1, 2)
  bool pass_layout = false;       // dispatch also gets get_dispatch_layout's tensors (and checks them)
  bool routing_by_flags = false;  // dispatch routes by is_token_in_rank (from the layout), topk_idx only labels
  Config config = small_config();
  uint64_t seed = 1;

  static Config small_config();  // 4 SMs, small queues: many laps around every ring
};

// One rank's inputs of a case, on the host and on the device.
class RankInputs {
 public:
  RankInputs(const Case& c, int rank, int num_ranks);

  int num_tokens() const { return T_; }
  int num_scales() const { return S_; }
  // Dispatch inputs for the CPU buffer (host memory) or the CUDA buffer (device copies).
  DispatchInputs dispatch_inputs(bool on_gpu) const;
  // Fresh random values in the same tensors (for graph replays), same routing unless `reroute`.
  void refresh(uint64_t seed, bool reroute);

 private:
  void generate(uint64_t seed, bool values_only);
  void upload();
  TensorView view(bool on_gpu, const void* host, const DeviceCopy& device, DType dtype,
                  std::initializer_list<int64_t> shape) const;

  Case case_;
  int rank_, num_ranks_;
  int T_, S_;
  std::vector<uint8_t> x_;       // [T, hidden] bf16 or fp8 bytes
  std::vector<float> scales_;    // storage of [T, S]: row-major or column-major
  std::vector<int64_t> topk64_;  // [T, K]
  std::vector<int32_t> topk32_;
  std::vector<float> weights_;  // [T, K]
  DeviceCopy x_d_, scales_d_, topk_d_, weights_d_;
};

// Random bf16 values (never zero), as raw bits.
std::vector<uint16_t> random_bf16(size_t count, uint64_t seed);

// Runs one case on both buffers of this rank and compares every output (layout, dispatch, handle,
// combine, cached dispatch). `rank` / `num_ranks` from the group.
void run_case(const Case& c, Buffer& cpu, Buffer& gpu, int rank, int num_ranks);

// Buffer options for the CPU reference (a fixed 32 MiB: it moves tokens in windows of any size) and
// for the CUDA buffer of a test with these configs (the largest size hint).
BufferOptions cpu_options();
BufferOptions gpu_options(int num_ranks, int64_t hidden_bytes, const std::vector<Config>& configs, int device);

// The error a call throws (fails the test if it throws none or another type).
template <class Fn>
std::optional<Error> error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  return std::nullopt;
}

}  // namespace epcomm::testing::normal
