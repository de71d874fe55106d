// The benchmark workloads of BENCHMARKS.md and the inputs every rank feeds them.
//
// Inputs are reproducible from (seed, rank, token, column) alone: routing from a per-rank random
// generator, token values from a hash. Every rank can therefore compute what any other rank sent,
// which is how the result checks know the exact expected bytes of every received row.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "options.hpp"

namespace epcomm::bench {

struct Workload {
  std::string name;  // "normal", "ll", "ll-small", "cpu-small"
  int tokens = 0;    // T per rank (and T_max of low-latency mode)
  int hidden = 0;
  int topk = 0;                   // K
  int experts = 0;                // E
  bool normal_mode = false;       // time get_dispatch_layout / dispatch / combine
  bool low_latency = false;       // time low_latency_dispatch / combine
  bool low_latency_bf16 = false;  // low-latency dispatch in BF16 as well as FP8
  bool skewed = false;            // 80/20 routing instead of uniform

  // The workload column of a result row: the name, with "-skewed" for skewed routing.
  std::string label() const { return skewed ? name + "-skewed" : name; }
};

// Known workload names; throws kInvalidArgument for others ("all" expands to the three GPU ones).
std::vector<Workload> resolve_workloads(const std::vector<std::string>& names, bool cuda);

// Ranks a CPU run uses when -n is not given.
constexpr int kDefaultCpuRanks = 4;

// Deterministic input values. Everything is a pure function of the seed and the coordinates.
class InputValues {
 public:
  explicit InputValues(uint64_t seed) : seed_(seed) {}

  // x[t, :] of `rank` in bf16: random sign, magnitude in [0.25, 4), never zero.
  void bf16_row(int rank, int64_t token, int hidden, uint16_t* out) const;
  // The FP8 input of normal-mode dispatch: e4m3 bytes (normal, finite, non-zero) and per-128-channel
  // float32 scales (powers of two times 1..1.875).
  void fp8_row(int rank, int64_t token, int hidden, uint8_t* out) const;
  float fp8_scale(int rank, int64_t token, int group) const;
  // topk_weights[t, k] in [0.25, 1.25).
  float topk_weight(int rank, int64_t token, int slot) const;

 private:
  uint64_t row_key(uint64_t kind, int rank, int64_t token) const;
  uint64_t seed_;
};

// topk_idx of one rank, [T, K] row-major int64, without -1 slots.
//   uniform: topk(|randn(T, E)| + 1, K), rows sorted by score like torch.topk;
//   skewed:  each slot picks from the 20% "hot" experts (the same set on every rank) with probability
//            0.8, else from the others, without repeating an expert within a token.
std::vector<int64_t> make_topk_idx(const Workload& workload, uint64_t seed, int rank);

uint64_t mix64(uint64_t value);

}  // namespace epcomm::bench
