#include <pybind11/pybind11.h>

#include "bindings.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/config.hpp"
#include "epcomm/event.hpp"
#include "epcomm/version.hpp"
#include "tensor_bridge.hpp"

#ifndef EPCOMM_PY_CUDA_ARCHITECTURES
#define EPCOMM_PY_CUDA_ARCHITECTURES ""
#endif

namespace epcomm::python {

namespace py = pybind11;

void bind_library(py::module_& m) {
  m.attr("__version__") = version();
  // The CUDA architectures libepcomm's kernels were compiled for (CMake's list), "" without CUDA.
  m.attr("cuda_architectures") = EPCOMM_PY_CUDA_ARCHITECTURES;
  py::dict codes;
  for (DType d : {DType::kBool, DType::kInt32, DType::kInt64, DType::kFloat32, DType::kBFloat16, DType::kFloat8E4M3})
    codes[py::str(to_string(d))] = dtype_code(d);
  m.attr("dtype_codes") = codes;

  m.def(
      "backend_available",
      [](const std::string& name) {
        if (name == "cpu") return backend_available(BackendKind::kCpu);
        if (name == "cuda") return backend_available(BackendKind::kCuda);
        throw Error(ErrorCode::kInvalidArgument,
                    "backend_available: name: expected 'cpu' or 'cuda', got '" + name + "'");
      },
      py::arg("name"));
  m.def("set_default_num_sms", &set_default_num_sms, py::arg("num_sms"));
  m.def("default_num_sms", &default_num_sms);
  m.def("low_latency_buffer_size_hint", &low_latency_buffer_size_hint, py::arg("num_max_dispatch_tokens_per_rank"),
        py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"));
}

void bind_events(py::module_& m) {
  py::class_<Event>(m, "Event", "Completion of epcomm work (a CUDA event, or an event that is already complete).")
      .def(py::init<>())
      .def_static(
          "record", [](uintptr_t stream) { return Event::record(stream_from_int(stream)); }, py::arg("stream"))
      .def_property_readonly("is_cuda", &Event::is_cuda)
      .def(
          "wait", [](const Event& e, uintptr_t stream) { e.wait(stream_from_int(stream)); }, py::arg("stream"))
      .def("synchronize",
           [](const Event& e) {
             py::gil_scoped_release release;
             e.synchronize();
           })
      .def("query", &Event::query);

  py::class_<RecvHook>(m, "RecvHook", "Runs the receive half of a low-latency call (once).")
      .def(
          "__call__",
          [](RecvHook& hook, uintptr_t stream) {
            py::gil_scoped_release release;
            hook(stream_from_int(stream));
          },
          py::arg("stream"))
      .def("__bool__", [](const RecvHook& hook) { return static_cast<bool>(hook); });
}

}  // namespace epcomm::python
