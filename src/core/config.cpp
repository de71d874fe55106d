#include "epcomm/config.hpp"

#include <atomic>

#include "core/check.hpp"
#include "core/layouts.hpp"

namespace epcomm {
namespace {
std::atomic<int> g_default_num_sms{20};

void check_num_sms(int num_sms, const char* op) {
  require(num_sms >= 2 && num_sms % 2 == 0, op, "num_sms", "expected an even number >= 2, got ", num_sms);
}
}  // namespace

void Config::validate() const {
  check_num_sms(num_sms, "Config");
  require(num_max_nvl_chunked_send_tokens > 0, "Config", "num_max_nvl_chunked_send_tokens", "expected > 0, got ",
          num_max_nvl_chunked_send_tokens);
  require(num_max_nvl_chunked_recv_tokens >= num_max_nvl_chunked_send_tokens, "Config",
          "num_max_nvl_chunked_recv_tokens", "expected >= num_max_nvl_chunked_send_tokens (",
          num_max_nvl_chunked_send_tokens, "), got ", num_max_nvl_chunked_recv_tokens);
  require(num_max_rdma_chunked_send_tokens > 0, "Config", "num_max_rdma_chunked_send_tokens", "expected > 0, got ",
          num_max_rdma_chunked_send_tokens);
  require(num_max_rdma_chunked_recv_tokens >= num_max_rdma_chunked_send_tokens, "Config",
          "num_max_rdma_chunked_recv_tokens", "expected >= num_max_rdma_chunked_send_tokens (",
          num_max_rdma_chunked_send_tokens, "), got ", num_max_rdma_chunked_recv_tokens);
}

int64_t Config::nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const {
  validate();
  require(hidden_bytes > 0, "Config.get_nvl_buffer_size_hint", "hidden_bytes", "expected > 0, got ", hidden_bytes);
  require(num_ranks >= 1 && num_ranks <= kMaxRanks, "Config.get_nvl_buffer_size_hint", "num_ranks", "expected 1..",
          kMaxRanks, ", got ", num_ranks);
  return NormalLayout::for_config(*this, hidden_bytes, num_ranks).total_bytes();
}

int64_t Config::rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks, int ranks_per_node) const {
  validate();
  if (ranks_per_node <= 0) ranks_per_node = num_ranks;
  require(ranks_per_node >= 1 && num_ranks % ranks_per_node == 0, "Config.get_rdma_buffer_size_hint", "num_ranks",
          "expected a multiple of ranks_per_node (", ranks_per_node, "), got ", num_ranks);
  const int num_nodes = num_ranks / ranks_per_node;
  if (num_nodes == 1) return 0;
  // One send and one receive queue per (node, channel), rdma-chunk tokens each.
  return kNormalControlBytes + int64_t(2) * num_nodes * (num_sms / 2) * num_max_rdma_chunked_recv_tokens *
                                   NormalLayout::token_record_bytes(hidden_bytes);
}

int default_num_sms() { return g_default_num_sms.load(); }

void set_default_num_sms(int num_sms) {
  check_num_sms(num_sms, "Buffer.set_num_sms");
  g_default_num_sms.store(num_sms);
}

// Dispatch publishes a sender's progress every 24 records instead of 6: each publication is a
// release at system scope, and fewer of them measured +15 % (8 SMs) and +23 % (FP8, 24 SMs) on
// 4 x H200 (bench/results/NOTES.md). Combine keeps 6: its receivers wait per token, and larger
// chunks measured slower there.
constexpr int kDispatchChunkTokens = 24;

Config default_dispatch_config(int num_ranks) {
  require(num_ranks >= 1, "get_dispatch_config", "num_ranks", "expected >= 1, got ", num_ranks);
  Config config;
  config.num_sms = default_num_sms();
  config.num_max_nvl_chunked_send_tokens = kDispatchChunkTokens;
  return config;
}

Config default_combine_config(int num_ranks) {
  require(num_ranks >= 1, "get_combine_config", "num_ranks", "expected >= 1, got ", num_ranks);
  Config config;
  config.num_sms = default_num_sms();
  return config;
}

int64_t low_latency_buffer_size_hint(int max_tokens_per_rank, int hidden, int num_ranks, int num_experts) {
  const char* op = "get_low_latency_rdma_size_hint";
  require(max_tokens_per_rank > 0, op, "num_max_dispatch_tokens_per_rank", "expected > 0, got ", max_tokens_per_rank);
  require(hidden > 0 && hidden % kFp8GroupSize == 0, op, "hidden", "expected a positive multiple of ", kFp8GroupSize,
          ", got ", hidden);
  require(num_ranks >= 1 && num_ranks <= kMaxRanks, op, "num_ranks", "expected 1..", kMaxRanks, ", got ", num_ranks);
  require(num_experts > 0 && num_experts % num_ranks == 0, op, "num_experts",
          "expected a positive multiple of num_ranks (", num_ranks, "), got ", num_experts);
  return LowLatencyLayout{max_tokens_per_rank, hidden, num_ranks, num_experts}.total_bytes();
}

}  // namespace epcomm
