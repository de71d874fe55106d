// How a backend allocates the output tensors of a call from the caller's allocator: contiguous, or
// column-major in the last two dimensions (the FP8 scale layouts of SPEC §3.2 and §4.2). One place
// for both backends (src/cuda and src/cpu both call it).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <utility>
#include <vector>

#include "epcomm/tensor.hpp"

namespace epcomm {

// A contiguous (row-major) output tensor of `shape`, first used on `stream`.
inline Tensor allocate(Allocator& allocator, DType dtype, std::initializer_list<int64_t> shape, Device device,
                       StreamHandle stream) {
  return allocator.allocate(dtype, std::span<const int64_t>(shape.begin(), shape.size()), device, stream);
}

// An output tensor of `shape` whose last two dimensions are column-major: the storage is allocated
// contiguous with those two dimensions swapped ([..., cols, rows]) and returned as its transpose, so
// that shape() is `shape` and stride(ndim - 2) == 1.
inline Tensor allocate_column_major(Allocator& allocator, DType dtype, std::initializer_list<int64_t> shape,
                                    Device device, StreamHandle stream) {
  std::vector<int64_t> storage_shape(shape);
  const int ndim = static_cast<int>(storage_shape.size());
  std::swap(storage_shape[ndim - 2], storage_shape[ndim - 1]);
  const Tensor storage = allocator.allocate(dtype, storage_shape, device, stream);
  return storage.with_view(storage.transposed(ndim - 2, ndim - 1));
}

}  // namespace epcomm
