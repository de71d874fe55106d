#include "epcomm/tensor.hpp"

#include <cstdlib>
#include <cstring>

#include "core/check.hpp"
#include "core/cuda_check.hpp"

namespace epcomm {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kBool:
      return 1;
    case DType::kInt32:
      return 4;
    case DType::kInt64:
      return 8;
    case DType::kFloat32:
      return 4;
    case DType::kBFloat16:
      return 2;
    case DType::kFloat8E4M3:
      return 1;
  }
  return 0;
}

const char* to_string(DType dtype) {
  switch (dtype) {
    case DType::kBool:
      return "bool";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat8E4M3:
      return "float8_e4m3fn";
  }
  return "?";
}

std::string to_string(const Device& device) {
  return device.is_cuda() ? concat("cuda:", device.index) : std::string("cpu");
}

TensorView TensorView::contiguous(void* data, DType dtype, std::span<const int64_t> shape, Device device) {
  if (shape.size() > static_cast<size_t>(kMaxDims))
    throw_error(ErrorCode::kInvalidArgument,
                concat("tensor: at most ", kMaxDims, " dims supported, got ", shape.size()));
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.device = device;
  view.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int d = view.ndim - 1; d >= 0; --d) {
    view.shape[d] = shape[d];
    view.strides[d] = stride;
    stride *= shape[d];
  }
  return view;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;  // size-1 dims may have any stride
    expected *= shape[d];
  }
  return true;
}

TensorView TensorView::transposed(int dim0, int dim1) const {
  TensorView view = *this;
  std::swap(view.shape[dim0], view.shape[dim1]);
  std::swap(view.strides[dim0], view.strides[dim1]);
  return view;
}

std::string TensorView::shape_string() const {
  std::string s = "[";
  for (int d = 0; d < ndim; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + "]";
}

namespace {

class DefaultAllocator final : public Allocator {
 public:
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle) override {
    TensorView view = TensorView::contiguous(nullptr, dtype, shape, device);
    // Never a zero-byte request: a valid pointer keeps "defined" tensors simple for callers.
    const size_t bytes = std::max<size_t>(view.nbytes(), 16);
    if (!device.is_cuda()) {
      void* data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      if (data == nullptr)
        throw_error(ErrorCode::kOutOfCapacity, concat("host allocation of ", bytes, " bytes failed"));
      view.data = data;
      return Tensor(view, std::shared_ptr<void>(data, [](void* p) { std::free(p); }));
    }
#if EPCOMM_WITH_CUDA
    DeviceGuard guard(device.index);
    void* data = nullptr;
    EPCOMM_CUDA_CHECK(cudaMalloc(&data, bytes));
    view.data = data;
    const int index = device.index;
    return Tensor(view, std::shared_ptr<void>(data, [index](void* p) {
                    DeviceGuard g(index);
                    cudaFree(p);  // never throws from a deleter
                  }));
#else
    throw_error(ErrorCode::kUnsupported, "default_allocator: CUDA tensors need a build of epcomm with CUDA");
#endif
  }
};

}  // namespace

Allocator& default_allocator() {
  static DefaultAllocator allocator;
  return allocator;
}

}  // namespace epcomm
