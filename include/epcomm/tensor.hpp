// Tensors as epcomm sees them: a descriptor of memory the caller owns (TensorView) and a result
// that keeps its own memory alive (Tensor).
//
// epcomm never takes ownership of an input. Outputs whose size is known only after the token counts
// are exchanged are created through an Allocator the caller may supply (the PyTorch front end passes
// one that calls torch.empty); the default allocator uses malloc / cudaMalloc.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>

// CUDA's own opaque types (cudaStream_t is CUstream_st*), declared here so that this header does
// not need the CUDA headers.
struct CUstream_st;
struct CUevent_st;

namespace epcomm {

enum class DType : uint8_t {
  kBool,  // 1 byte, 0 or 1
  kInt32,
  kInt64,
  kFloat32,
  kBFloat16,
  kFloat8E4M3,  // float8_e4m3fn: finite only, max 448
};

size_t dtype_size(DType dtype);
const char* to_string(DType dtype);

enum class DeviceType : uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;  // CUDA ordinal; 0 for the CPU

  static Device cpu() { return {DeviceType::kCPU, 0}; }
  static Device cuda(int index) { return {DeviceType::kCUDA, index}; }
  bool is_cuda() const { return type == DeviceType::kCUDA; }
  bool operator==(const Device&) const = default;
};

std::string to_string(const Device& device);

// Opaque CUDA handles, layout-compatible with cudaStream_t / cudaEvent_t, so that this header does
// not need the CUDA headers. nullptr is the legacy default stream; the CPU backend ignores streams.
using StreamHandle = ::CUstream_st*;

constexpr int kMaxDims = 4;

// A strided view of memory owned by someone else. Strides are in elements, like PyTorch's.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};
  Device device{};

  // A row-major (contiguous) view.
  static TensorView contiguous(void* data, DType dtype, std::span<const int64_t> shape, Device device);
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device) {
    return contiguous(data, dtype, std::span<const int64_t>(shape.begin(), shape.size()), device);
  }

  int64_t size(int dim) const { return shape[dim]; }
  int64_t stride(int dim) const { return strides[dim]; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  bool is_contiguous() const;
  // The same memory with two dimensions swapped (no copy), like torch.Tensor.transpose.
  TensorView transposed(int dim0, int dim1) const;
  std::string shape_string() const;  // "[4, 7168]"

  template <class T>
  T* data_as() const {
    return static_cast<T*>(data);
  }
};

// A view that keeps its memory alive: outputs of epcomm calls. Copying shares the memory.
class Tensor : public TensorView {
 public:
  Tensor() = default;
  Tensor(const TensorView& view, std::shared_ptr<void> storage) : TensorView(view), storage_(std::move(storage)) {}
  // Wraps memory the caller owns (for example an `out=` argument); keeps nothing alive.
  static Tensor borrowed(const TensorView& view) { return Tensor(view, nullptr); }

  const std::shared_ptr<void>& storage() const { return storage_; }
  // The same storage seen through another view (e.g. a transpose of this tensor).
  Tensor with_view(const TensorView& view) const { return Tensor(view, storage_); }

 private:
  std::shared_ptr<void> storage_;
};

// Creates output tensors. `stream` is the stream the output will first be written on.
class Allocator {
 public:
  virtual ~Allocator() = default;
  // Returns a contiguous tensor of the given dtype and shape on `device`.
  virtual Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) = 0;
};

// malloc on the CPU, cudaMalloc on a CUDA device (freed with cudaFree when the last Tensor goes).
Allocator& default_allocator();

}  // namespace epcomm
