// An Allocator that keeps freed blocks and hands them out again for requests of the same size, like
// PyTorch's caching allocator: the outputs of a call repeated in a timing loop then cost no
// cudaMalloc / malloc (which would synchronise the device or dominate small CPU calls).
//
// Blocks are reused in host order. That is safe here because every timed call runs with
// async_finish = false on one caller stream: work that used a block is ordered before work that
// reuses it.
#pragma once

#include <functional>
#include <memory>

#include "epcomm/tensor.hpp"

namespace epcomm::bench {

class CachingAllocator final : public Allocator {
 public:
  using RawAllocate = std::function<void*(size_t bytes)>;
  using RawFree = std::function<void(void* data)>;

  CachingAllocator(RawAllocate allocate, RawFree free);
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) override;

 private:
  struct Pool;
  // Shared with the deleters of the tensors handed out, so a block can return after the allocator is gone.
  std::shared_ptr<Pool> pool_;
};

}  // namespace epcomm::bench
