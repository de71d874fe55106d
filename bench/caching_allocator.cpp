#include "caching_allocator.hpp"

#include <algorithm>
#include <map>
#include <mutex>

#include "core/check.hpp"

namespace epcomm::bench {

struct CachingAllocator::Pool {
  RawAllocate raw_allocate;
  RawFree raw_free;
  std::mutex mutex;
  std::multimap<size_t, void*> free_blocks;  // by rounded size

  ~Pool() {
    for (auto& [bytes, data] : free_blocks) raw_free(data);
  }

  void* take(size_t bytes) {
    {
      std::lock_guard lock(mutex);
      auto it = free_blocks.find(bytes);
      if (it != free_blocks.end()) {
        void* data = it->second;
        free_blocks.erase(it);
        return data;
      }
    }
    void* data = raw_allocate(bytes);
    if (data == nullptr)
      throw_error(ErrorCode::kOutOfCapacity, concat("epcomm-bench: allocation of ", bytes, " bytes failed"));
    return data;
  }

  void give_back(size_t bytes, void* data) {
    std::lock_guard lock(mutex);
    free_blocks.emplace(bytes, data);
  }
};

CachingAllocator::CachingAllocator(RawAllocate allocate, RawFree free) : pool_(std::make_shared<Pool>()) {
  pool_->raw_allocate = std::move(allocate);
  pool_->raw_free = std::move(free);
}

Tensor CachingAllocator::allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle) {
  TensorView view = TensorView::contiguous(nullptr, dtype, shape, device);
  // Rounded to 512 B so that nearby sizes share blocks; the pool never splits or merges blocks.
  const size_t bytes = (std::max<size_t>(view.nbytes(), 1) + 511) / 512 * 512;
  view.data = pool_->take(bytes);
  std::shared_ptr<Pool> pool = pool_;
  return Tensor(view, std::shared_ptr<void>(view.data, [pool, bytes](void* data) { pool->give_back(bytes, data); }));
}

}  // namespace epcomm::bench
