// Low-latency mode on GPUs (SPEC §4) over NVSHMEM: the part of the CUDA backend that owns the
// symmetric memory and the low-latency kernels. CudaBackend forwards its low-latency calls here;
// arguments arrive already checked by the front (core/op_checks.cpp).
#pragma once

#include <memory>
#include <vector>

#include "cuda/cuda_context.hpp"

namespace epcomm::cuda {

class LowLatencyMode {
 public:
  virtual ~LowLatencyMode() = default;

  virtual LowLatencyDispatchResult dispatch(const LowLatencyDispatchArgs& args, const LowLatencyOptions& options) = 0;
  virtual LowLatencyCombineResult combine(const LowLatencyCombineArgs& args, const LowLatencyOptions& options) = 0;
  virtual TensorView next_combine_buffer(const LowLatencyHandle& handle) = 0;
  virtual void clean(int max_tokens_per_rank, int hidden, int num_experts, cudaStream_t stream) = 0;

  virtual void update_mask(int rank, bool mask, cudaStream_t stream) = 0;
  virtual TensorView query_mask() = 0;
  virtual void clean_mask(cudaStream_t stream) = 0;

  // The front rejected this rank's inputs of a dispatch (`dispatch`) or combine: the call takes its
  // parity as if it had run, so that this rank's next call of that kind never meets its peers' rejected
  // one on the same parity (it waits on the other parity and times out, loudly) and, when every rank
  // rejected alike, all stay in step (SPEC §5). Nothing was launched.
  virtual void skip_call(bool dispatch) = 0;
  // [R]: true where this rank sends to that peer with NVSHMEM puts (the peer table's zero entries).
  virtual std::vector<bool> put_peers() const = 0;
  // This rank's symmetric memory (num_rdma_bytes), for get_local_buffer_tensor.
  virtual void* local_memory() const = 0;
  // Collective when `collective`; releases NVSHMEM state. Idempotent, never throws when !collective.
  virtual void destroy(bool collective) = 0;
};

// Collective over ctx.bootstrap: initialises NVSHMEM (unique-id bootstrap) and allocates
// options.num_rdma_bytes of symmetric memory. Throws Error(kUnsupported) when epcomm was built
// without NVSHMEM.
std::unique_ptr<LowLatencyMode> make_low_latency_mode(const CudaContext& ctx);
// False when epcomm was built without NVSHMEM (make_low_latency_mode then throws).
bool low_latency_mode_built();

}  // namespace epcomm::cuda
