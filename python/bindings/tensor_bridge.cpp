#include "tensor_bridge.hpp"

#include <memory>
#include <string>

#include "dlpack.hpp"
#include "epcomm/error.hpp"
#include "python_objects.hpp"

namespace epcomm::python {
namespace {

constexpr int kNumDTypes = 6;  // DType::kBool .. DType::kFloat8E4M3

// Torch entry points, looked up once. Never freed: they must outlive every tensor at shutdown.
struct TorchApi {
  py::object empty;
  py::object from_dlpack;
  py::object uint8;
  py::object dtypes[kNumDTypes];
};

const TorchApi& torch_api() {
  static const TorchApi* api = [] {
    py::module_ torch = py::module_::import("torch");
    auto* a = new TorchApi;
    a->empty = torch.attr("empty");
    a->from_dlpack = torch.attr("from_dlpack");
    a->uint8 = torch.attr("uint8");
    const char* names[kNumDTypes] = {"bool", "int32", "int64", "float32", "bfloat16", "float8_e4m3fn"};
    for (int i = 0; i < kNumDTypes; ++i) a->dtypes[i] = torch.attr(names[i]);
    return a;
  }();
  return *api;
}

const py::object& torch_dtype(DType dtype) { return torch_api().dtypes[dtype_code(dtype)]; }

py::object torch_device(const Device& device) {
  return py::str(device.is_cuda() ? "cuda:" + std::to_string(device.index) : std::string("cpu"));
}

// The storage of an output created by PyAllocator: owns one reference to the torch tensor.
// Identified later with std::get_deleter, which also works through aliasing shared_ptrs.
struct TorchStorage {
  PyObject* tensor = nullptr;
  uintptr_t data = 0;  // the tensor's data_ptr()
  DType dtype = DType::kFloat32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  void operator()(void*) const { release_python_reference(tensor); }
};

// What a DLPack capsule handed to torch keeps alive.
struct DlpackContext {
  std::shared_ptr<void> storage;  // the epcomm::Tensor's storage, if any
  PyObject* owner = nullptr;      // one reference (e.g. the Buffer), or nullptr
  int64_t shape[1] = {0};
  dlpack::ManagedTensor managed{};
};

void delete_dlpack_context(dlpack::ManagedTensor* managed) {
  auto* context = static_cast<DlpackContext*>(managed->manager_ctx);
  release_python_reference(context->owner);
  delete context;  // drops the storage; its deleter takes the GIL itself if it needs it
}

// Runs when the capsule object dies. A consumer renames the capsule when it takes ownership; if
// nobody did, the memory's owner is released here.
void destroy_capsule(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, dlpack::kCapsuleName)) return;
  auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleName));
  if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
}

py::object bytes_capsule_tensor(void* data, int64_t bytes, Device device, std::shared_ptr<void> storage,
                                const py::object& owner) {
  auto* context = new DlpackContext;
  context->storage = std::move(storage);
  if (!owner.is_none()) context->owner = owner.inc_ref().ptr();
  context->shape[0] = bytes;
  dlpack::Tensor& t = context->managed.dl_tensor;
  t.data = data;
  t.device = {device.is_cuda() ? dlpack::kDeviceCUDA : dlpack::kDeviceCPU, device.is_cuda() ? device.index : 0};
  t.ndim = 1;
  t.dtype = {dlpack::kCodeUInt, 8, 1};
  t.shape = context->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  context->managed.manager_ctx = context;
  context->managed.deleter = &delete_dlpack_context;
  PyObject* capsule = PyCapsule_New(&context->managed, dlpack::kCapsuleName, &destroy_capsule);
  if (capsule == nullptr) {
    delete_dlpack_context(&context->managed);
    throw py::error_already_set();
  }
  return torch_api().from_dlpack(py::reinterpret_steal<py::object>(capsule));
}

py::tuple int_tuple(const int64_t* values, int n) {
  py::tuple out(n);
  for (int i = 0; i < n; ++i) out[i] = py::int_(values[i]);
  return out;
}

// Elements from the first to one past the last element the view can reach.
int64_t span_elements(const TensorView& view) {
  int64_t last = 0;
  for (int d = 0; d < view.ndim; ++d) last += (view.shape[d] - 1) * view.strides[d];
  return last + 1;
}

py::object empty_like_view(const TensorView& view) {
  return torch_api().empty(int_tuple(view.shape.data(), view.ndim), py::arg("dtype") = torch_dtype(view.dtype),
                           py::arg("device") = torch_device(view.device));
}

// A view of the torch tensor PyAllocator created.
py::object view_of_allocation(const TorchStorage& storage, const TensorView& view) {
  py::object base = py::reinterpret_borrow<py::object>(storage.tensor);
  const bool same_start = reinterpret_cast<uintptr_t>(view.data) == storage.data && view.dtype == storage.dtype;
  const bool same_shape = view.ndim == storage.ndim &&
                          std::equal(view.shape.begin(), view.shape.begin() + view.ndim, storage.shape.begin());
  if (same_start && same_shape && view.is_contiguous()) return base;
  py::object flat = base.attr("reshape")(-1);
  if (view.dtype != storage.dtype) flat = flat.attr("view")(torch_api().uint8).attr("view")(torch_dtype(view.dtype));
  const auto offset_bytes = static_cast<int64_t>(reinterpret_cast<uintptr_t>(view.data) - storage.data);
  const auto element = static_cast<int64_t>(dtype_size(view.dtype));
  if (offset_bytes < 0 || offset_bytes % element != 0)
    throw Error(ErrorCode::kInternal, "epcomm binding: a result does not lie inside the tensor allocated for it");
  return flat.attr("as_strided")(int_tuple(view.shape.data(), view.ndim), int_tuple(view.strides.data(), view.ndim),
                                 offset_bytes / element);
}

DType dtype_from_code(long code, const char* what) {
  if (code < 0 || code >= kNumDTypes)
    throw py::value_error(std::string(what) + ": unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

int read_dims(const py::handle& seq, std::array<int64_t, kMaxDims>& out, const char* what) {
  auto items = py::reinterpret_borrow<py::tuple>(seq);
  if (items.size() > static_cast<size_t>(kMaxDims))
    throw py::value_error(std::string(what) + ": at most " + std::to_string(kMaxDims) +
                          " dimensions are supported, got " + std::to_string(items.size()));
  for (size_t i = 0; i < items.size(); ++i) out[i] = items[i].cast<int64_t>();
  return static_cast<int>(items.size());
}

}  // namespace

TensorView view_from_python(const py::handle& spec, const char* what) {
  if (!PyTuple_Check(spec.ptr()) || PyTuple_GET_SIZE(spec.ptr()) != 6)
    throw py::type_error(std::string(what) + ": expected a tensor description tuple of 6 items");
  auto items = py::reinterpret_borrow<py::tuple>(spec);
  TensorView view;
  view.data = reinterpret_cast<void*>(items[0].cast<uintptr_t>());
  view.dtype = dtype_from_code(items[1].cast<long>(), what);
  view.ndim = read_dims(items[2], view.shape, what);
  if (read_dims(items[3], view.strides, what) != view.ndim)
    throw py::value_error(std::string(what) + ": shape and strides differ in length");
  const long device_type = items[4].cast<long>();
  if (device_type != 0 && device_type != 1)
    throw py::value_error(std::string(what) + ": unknown device type code " + std::to_string(device_type));
  view.device = {device_type == 1 ? DeviceType::kCUDA : DeviceType::kCPU, items[5].cast<int>()};
  return view;
}

std::optional<TensorView> optional_view(const py::handle& spec, const char* what) {
  if (spec.is_none()) return std::nullopt;
  return view_from_python(spec, what);
}

StreamHandle stream_from_int(uintptr_t handle) { return reinterpret_cast<StreamHandle>(handle); }

Tensor PyAllocator::allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle) {
  py::gil_scoped_acquire gil;
  py::tuple result = allocate_(dtype_code(dtype), int_tuple(shape.data(), static_cast<int>(shape.size())),
                               device.is_cuda() ? device.index : -1);
  const TensorView view =
      TensorView::contiguous(reinterpret_cast<void*>(result[1].cast<uintptr_t>()), dtype, shape, device);
  TorchStorage storage;
  storage.data = reinterpret_cast<uintptr_t>(view.data);
  storage.dtype = dtype;
  storage.ndim = view.ndim;
  storage.shape = view.shape;
  storage.tensor = py::object(result[0]).release().ptr();
  return Tensor(view, std::shared_ptr<void>(view.data, storage));
}

py::object to_torch(const Tensor& tensor, const py::object& owner) {
  if (tensor.numel() == 0) return empty_like_view(tensor);
  if (const TorchStorage* storage = std::get_deleter<TorchStorage>(tensor.storage()))
    return view_of_allocation(*storage, tensor);
  const int64_t bytes = span_elements(tensor) * static_cast<int64_t>(dtype_size(tensor.dtype));
  py::object flat = bytes_capsule_tensor(tensor.data, bytes, tensor.device, tensor.storage(), owner);
  return flat.attr("view")(torch_dtype(tensor.dtype))
      .attr("as_strided")(int_tuple(tensor.shape.data(), tensor.ndim), int_tuple(tensor.strides.data(), tensor.ndim));
}

py::object to_torch_optional(const std::optional<Tensor>& tensor, const py::object& owner) {
  return tensor ? to_torch(*tensor, owner) : py::none();
}

py::object bytes_as_torch(void* data, int64_t bytes, Device device, const py::object& owner) {
  if (bytes == 0)
    return torch_api().empty(0, py::arg("dtype") = torch_api().uint8, py::arg("device") = torch_device(device));
  return bytes_capsule_tensor(data, bytes, device, nullptr, owner);
}

}  // namespace epcomm::python
