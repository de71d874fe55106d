// How tensors cross between torch (Python) and epcomm (C++) without PyTorch's C++ headers.
//
//   Python -> C++: the front end describes each torch tensor as a tuple
//                  (data_ptr, dtype code, shape, strides, device type code, device index),
//                  read here into an epcomm::TensorView (see epcomm/_tensors.py).
//   outputs      : created by PyAllocator, which calls back into Python (torch.empty) and keeps
//                  the torch tensor alive in the epcomm::Tensor's storage.
//   C++ -> Python: to_torch() gives back that very torch tensor (as_strided for other views of
//                  it, such as column-major scales); memory torch does not own (epcomm's own
//                  buffers) goes out through DLPack and keeps its owner alive.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "epcomm/tensor.hpp"

namespace epcomm::python {

namespace py = pybind11;

// Reads the Python tuple described above. Throws py::value_error naming `what` when malformed.
TensorView view_from_python(const py::handle& spec, const char* what);
std::optional<TensorView> optional_view(const py::handle& spec, const char* what);

StreamHandle stream_from_int(uintptr_t handle);

// Creates outputs through a Python callable `allocate(dtype_code, shape, cuda_device) -> (tensor, data_ptr)`
// (cuda_device = -1 for the CPU). The callable chooses the stream; the `stream` argument epcomm passes
// is ignored because the front end decides (allocate_on_comm_stream) which stream owns the memory.
class PyAllocator final : public Allocator {
 public:
  explicit PyAllocator(py::object allocate) : allocate_(std::move(allocate)) {}
  Tensor allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) override;

 private:
  py::object allocate_;
};

// The torch tensor for an epcomm result. `owner` is kept alive by tensors that view memory torch
// does not own (pass the Python Buffer object; None when the memory has another owner).
// Requires the GIL.
py::object to_torch(const Tensor& tensor, const py::object& owner);
py::object to_torch_optional(const std::optional<Tensor>& tensor, const py::object& owner);

// A uint8 torch tensor over `bytes` bytes at `data` on `device`, keeping `owner` alive (DLPack).
py::object bytes_as_torch(void* data, int64_t bytes, Device device, const py::object& owner);

// The dtype code the Python side uses for each epcomm::DType (the enum's value).
inline int dtype_code(DType dtype) { return static_cast<int>(dtype); }

}  // namespace epcomm::python
