#include "workload.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "core/check.hpp"

namespace epcomm::bench {
namespace {

Workload make(const std::string& name, int tokens, int hidden, int topk, int experts) {
  Workload w;
  w.name = name;
  w.tokens = tokens;
  w.hidden = hidden;
  w.topk = topk;
  w.experts = experts;
  return w;
}

Workload named_workload(const std::string& name) {
  // DeepSeek-V3 shapes (BENCHMARKS.md "Workloads"), plus a small one for the CPU backend.
  if (name == "normal") {
    Workload w = make(name, 4096, 7168, 8, 256);
    w.normal_mode = true;
    return w;
  }
  if (name == "ll") {
    Workload w = make(name, 128, 7168, 8, 256);
    w.low_latency = true;
    w.low_latency_bf16 = true;
    return w;
  }
  if (name == "ll-small") {
    Workload w = make(name, 1, 7168, 8, 256);
    w.low_latency = true;
    return w;
  }
  if (name.rfind("ll-t", 0) == 0) {  // ll-t<N>: the ll shape with N tokens per rank (tuning sweeps)
    const std::string digits = name.substr(4);
    const bool numeric = !digits.empty() && digits.size() <= 4 &&
                         std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
    const int tokens = numeric ? std::stoi(digits) : 0;
    if (tokens < 1 || tokens > 1024)
      throw_error(ErrorCode::kInvalidArgument,
                  concat("epcomm-bench: --workload: ll-t<N> needs 1 <= N <= 1024, got '", name, "'"));
    Workload w = make(name, tokens, 7168, 8, 256);
    w.low_latency = true;
    return w;
  }
  if (name == "cpu-small") {
    Workload w = make(name, 256, 1024, 8, 64);
    w.normal_mode = true;
    w.low_latency = true;
    w.low_latency_bf16 = true;
    return w;
  }
  throw_error(
      ErrorCode::kInvalidArgument,
      concat("epcomm-bench: --workload: expected normal, ll, ll-small, ll-t<N>, cpu-small or all, got '", name, "'"));
}

// Same generator, same salt, on every rank: the hot experts of skewed routing.
std::vector<int> hot_expert_flags(int experts, uint64_t seed) {
  std::vector<int> order(experts);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 generator(mix64(seed ^ 0x686f742d65787073ull));
  std::shuffle(order.begin(), order.end(), generator);
  const int num_hot = std::max(1, static_cast<int>(std::lround(0.2 * experts)));
  std::vector<int> hot(experts, 0);
  for (int i = 0; i < num_hot; ++i) hot[order[i]] = 1;
  return hot;
}

void uniform_topk(const Workload& w, std::mt19937_64& generator, std::vector<int64_t>& out) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> score(w.experts);
  std::vector<int> order(w.experts);
  for (int t = 0; t < w.tokens; ++t) {
    for (float& s : score) s = std::fabs(normal(generator)) + 1.0f;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + w.topk, order.end(),
                      [&](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
    for (int k = 0; k < w.topk; ++k) out[int64_t(t) * w.topk + k] = order[k];
  }
}

void skewed_topk(const Workload& w, uint64_t seed, std::mt19937_64& generator, std::vector<int64_t>& out) {
  const std::vector<int> hot = hot_expert_flags(w.experts, seed);
  std::vector<int> pools[2];  // [0] cold, [1] hot: experts not yet chosen by the current token
  std::bernoulli_distribution pick_hot(0.8);
  for (int t = 0; t < w.tokens; ++t) {
    pools[0].clear();
    pools[1].clear();
    for (int e = 0; e < w.experts; ++e) pools[hot[e]].push_back(e);
    for (int k = 0; k < w.topk; ++k) {
      int which = pick_hot(generator) ? 1 : 0;
      if (pools[which].empty()) which = 1 - which;
      std::vector<int>& pool = pools[which];
      std::uniform_int_distribution<size_t> index(0, pool.size() - 1);
      const size_t i = index(generator);
      out[int64_t(t) * w.topk + k] = pool[i];
      pool[i] = pool.back();
      pool.pop_back();
    }
  }
}

}  // namespace

uint64_t mix64(uint64_t value) {  // splitmix64's finaliser: a good 64-bit hash
  value += 0x9E3779B97F4A7C15ull;
  value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9ull;
  value = (value ^ (value >> 27)) * 0x94D049BB133111EBull;
  return value ^ (value >> 31);
}

std::vector<Workload> resolve_workloads(const std::vector<std::string>& names, bool cuda) {
  std::vector<std::string> expanded;
  if (names.empty()) {
    expanded = cuda ? std::vector<std::string>{"normal", "ll", "ll-small"} : std::vector<std::string>{"cpu-small"};
  }
  for (const std::string& name : names) {
    if (name == "all")
      expanded.insert(expanded.end(), {"normal", "ll", "ll-small"});
    else
      expanded.push_back(name);
  }
  std::vector<Workload> workloads;
  for (const std::string& name : expanded) workloads.push_back(named_workload(name));
  return workloads;
}

uint64_t InputValues::row_key(uint64_t kind, int rank, int64_t token) const {
  return mix64(mix64(mix64(seed_ ^ kind) ^ static_cast<uint64_t>(rank)) ^ static_cast<uint64_t>(token));
}

void InputValues::bf16_row(int rank, int64_t token, int hidden, uint16_t* out) const {
  const uint64_t key = row_key(0x6266313600000000ull, rank, token);
  for (int h = 0; h < hidden; ++h) {
    const uint64_t bits = mix64(key + static_cast<uint64_t>(h));
    const uint16_t sign = static_cast<uint16_t>(bits & 1u) << 15;
    const uint16_t exponent = static_cast<uint16_t>(125u + ((bits >> 1) & 3u)) << 7;  // 2^-2 .. 2^1
    const uint16_t mantissa = static_cast<uint16_t>((bits >> 3) & 0x7Fu);
    out[h] = sign | exponent | mantissa;
  }
}

void InputValues::fp8_row(int rank, int64_t token, int hidden, uint8_t* out) const {
  const uint64_t key = row_key(0x6670380000000000ull, rank, token);
  for (int h = 0; h < hidden; ++h) {
    const uint64_t bits = mix64(key + static_cast<uint64_t>(h));
    const uint8_t sign = static_cast<uint8_t>((bits & 1u) << 7);
    const uint8_t exponent = static_cast<uint8_t>(4u + ((bits >> 1) & 7u)) << 3;  // biased 4..11: normal, finite
    const uint8_t mantissa = static_cast<uint8_t>((bits >> 4) & 7u);
    out[h] = sign | exponent | mantissa;
  }
}

float InputValues::fp8_scale(int rank, int64_t token, int group) const {
  const uint64_t bits = mix64(row_key(0x7363616c65000000ull, rank, token) + static_cast<uint64_t>(group));
  const uint32_t exponent = 127u - 4u + static_cast<uint32_t>(bits & 7u);  // 2^-4 .. 2^3
  const uint32_t mantissa = static_cast<uint32_t>((bits >> 3) & 7u) << 20;
  const uint32_t word = (exponent << 23) | mantissa;
  float scale;
  static_assert(sizeof(scale) == sizeof(word));
  std::memcpy(&scale, &word, sizeof(scale));
  return scale;
}

float InputValues::topk_weight(int rank, int64_t token, int slot) const {
  const uint64_t bits = mix64(row_key(0x776569676874000ull, rank, token) + static_cast<uint64_t>(slot));
  return 0.25f + static_cast<float>(bits >> 40) * 0x1p-24f;  // 24-bit fraction: exact in float
}

std::vector<int64_t> make_topk_idx(const Workload& workload, uint64_t seed, int rank) {
  std::vector<int64_t> topk_idx(static_cast<size_t>(workload.tokens) * workload.topk);
  std::mt19937_64 generator(mix64(seed ^ (uint64_t(rank) << 32) ^ (workload.skewed ? 0x5CEull : 0x0ull)));
  if (workload.skewed)
    skewed_topk(workload, seed, generator, topk_idx);
  else
    uniform_topk(workload, generator, topk_idx);
  return topk_idx;
}

}  // namespace epcomm::bench
