// Per-call tuning of high-throughput mode and the buffer sizes that go with it (SPEC §3.5, §6).
#pragma once

#include <cstdint>

namespace epcomm {

struct Config {
  // Streaming multiprocessors normal-mode kernels may occupy (even, >= 2). Honoured exactly.
  int num_sms = 20;
  // Tokens a sender moves per step into a receiver's queue, and the queue's capacity (tokens).
  int num_max_nvl_chunked_send_tokens = 6;
  int num_max_nvl_chunked_recv_tokens = 256;
  // Same for the RDMA path between nodes (accepted; inter-node GPU mode is not built yet).
  int num_max_rdma_chunked_send_tokens = 6;
  int num_max_rdma_chunked_recv_tokens = 128;

  // Bytes of NVLink-domain communication memory (Buffer's num_nvl_bytes) that are always enough for
  // dispatch / combine with this config, for tokens of `hidden_bytes` bytes (hidden * 2 for bf16;
  // pass the bf16 size for fp8 too) and `num_ranks` ranks in the NVLink domain.
  int64_t nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const;
  // Same for the RDMA memory (num_rdma_bytes) of normal mode across nodes; 0 when there is one node.
  int64_t rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks, int ranks_per_node) const;

  // Throws epcomm::Error(kInvalidArgument) naming the first bad field.
  void validate() const;
};

// The SM count used when a call passes no Config (Buffer::set_num_sms; default 20).
int default_num_sms();
void set_default_num_sms(int num_sms);

// Good defaults for `num_ranks` ranks (SPEC §6: Buffer.get_dispatch_config / get_combine_config).
Config default_dispatch_config(int num_ranks);
Config default_combine_config(int num_ranks);

// Bytes of communication memory low-latency mode needs (Buffer's num_rdma_bytes with
// low_latency_mode): always enough for calls with at most `max_tokens_per_rank` tokens per rank.
int64_t low_latency_buffer_size_hint(int max_tokens_per_rank, int hidden, int num_ranks, int num_experts);

}  // namespace epcomm
