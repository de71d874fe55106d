// Test data for MoE dispatch / combine: a portable random generator, routing generators, token values
// that say where they came from, and an allocator that poisons every output.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "epcomm/tensor.hpp"

namespace epcomm::testing {

// splitmix64: the same sequence on every platform (std:: distributions are not portable).
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  int below(int n) { return static_cast<int>(next() % uint64_t(n)); }  // [0, n)
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }        // [0, 1)
  // 16 random bits; four per draw of next() (test data needs many values quickly).
  uint16_t next16() {
    if (cached_ == 0) {
      cache_ = next();
      cached_ = 4;
    }
    --cached_;
    return static_cast<uint16_t>(cache_ >> (16 * cached_));
  }

 private:
  uint64_t state_;
  uint64_t cache_ = 0;
  int cached_ = 0;
};

// A seed for (case seed, rank, purpose): each rank's inputs can be regenerated anywhere.
uint64_t seed_for(uint64_t case_seed, int rank, int purpose);

// ---- routing --------------------------------------------------------------------------------
enum class RoutingKind {
  kUniform,  // K distinct experts per token, uniformly
  kSkewed,   // K distinct experts, 20% of the experts draw 80% of the selections
};

// [T, K] int64, distinct experts per token; each slot is -1 with probability `empty_fraction`.
std::vector<int64_t> make_topk_idx(Rng& rng, int num_tokens, int num_topk, int num_experts, RoutingKind kind,
                                   double empty_fraction);
// [T, K] float32 in [0.05, 1.05): never zero.
std::vector<float> make_topk_weights(Rng& rng, int num_tokens, int num_topk);

// ---- values ---------------------------------------------------------------------------------
// A bf16 [T, hidden] row whose first three columns name its origin exactly (small integers are exact
// in bf16): column 0 = rank + 1, column 1 = token / 256 + 1, column 2 = token % 256 + 1. The other
// columns are random nonzero bf16 values of mixed magnitudes (so that float sums depend on order).
std::vector<uint16_t> make_tagged_bf16(Rng& rng, int rank, int num_tokens, int hidden);
// A random nonzero bf16 value, magnitude in [2^-16, 2^8), exponents spread uniformly.
uint16_t random_bf16(Rng& rng);
// A bf16 value for data that gets summed (expert outputs, biases): half are +-2^12 or +-1.5 * 2^12,
// half are small (2^-8 .. 2^0). Large values cancel while small ones are absorbed or not depending on
// when they are added, so a float sum of a few of them, even rounded to bf16, depends on the order.
uint16_t order_sensitive_bf16(Rng& rng);
// Fills `row` with order_sensitive_bf16 values (fast: test rows of DeepSeek's shape are large).
void fill_order_sensitive(Rng& rng, std::span<uint16_t> row);
// "(rank 2, token 17)" read back from a tagged row, or "(untagged ...)".
std::string describe_tagged_row(const uint16_t* row);

// An e4m3 payload [T, hidden] (random finite codes, never 0) and its scales [T, S] (row-major here),
// with scales[t][0] = rank * 65536 + token + 1 exactly (a tag that survives float32).
std::vector<uint8_t> make_fp8(Rng& rng, int num_tokens, int hidden);
std::vector<float> make_tagged_scales(Rng& rng, int rank, int num_tokens, int num_scales);

// ---- tensors --------------------------------------------------------------------------------
template <class T>
TensorView view_of(std::vector<T>& data, DType dtype, std::initializer_list<int64_t> shape) {
  return TensorView::contiguous(data.data(), dtype, shape, Device::cpu());
}

// Allocates like default_allocator() and fills every byte with 0xA5: an output the backend forgot to
// write reads as a value no correct output has (bf16 -2.9e-16, int64 very negative, bool 165).
class PoisonAllocator final : public Allocator {
 public:
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) override;
};

}  // namespace epcomm::testing
