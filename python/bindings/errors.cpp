#include "errors.hpp"

#include "epcomm/error.hpp"

namespace epcomm::python {
namespace {

namespace py = pybind11;

struct ErrorTypes {
  PyObject* base = nullptr;
  PyObject* invalid_argument = nullptr;
  PyObject* unsupported = nullptr;
  PyObject* timeout = nullptr;
  PyObject* peer_failure = nullptr;
  PyObject* out_of_capacity = nullptr;
  PyObject* internal = nullptr;
  PyObject* buffer_failed = nullptr;
};

ErrorTypes g_types;  // owned by the module object (one reference each, never released)

PyObject* new_exception(py::module_& module, const char* name, py::tuple bases, const char* doc) {
  const std::string qualified = std::string("epcomm.") + name;  // shown as epcomm.<name>
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases.ptr(), nullptr);
  if (type == nullptr) throw py::error_already_set();
  module.add_object(name, py::reinterpret_borrow<py::object>(type));
  return type;
}

PyObject* type_for(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return g_types.invalid_argument;
    case ErrorCode::kUnsupported:
      return g_types.unsupported;
    case ErrorCode::kTimeout:
      return g_types.timeout;
    case ErrorCode::kPeerFailure:
      return g_types.peer_failure;
    case ErrorCode::kOutOfCapacity:
      return g_types.out_of_capacity;
    case ErrorCode::kInternal:
      return g_types.internal;
    case ErrorCode::kBufferFailed:
      return g_types.buffer_failed;
  }
  return g_types.base;
}

}  // namespace

void bind_errors(py::module_& m) {
  auto bases = [](std::initializer_list<PyObject*> types) {
    py::tuple out(types.size());
    size_t i = 0;
    for (PyObject* t : types) out[i++] = py::reinterpret_borrow<py::object>(t);
    return out;
  };
  g_types.base = new_exception(m, "Error", bases({PyExc_RuntimeError}), "Base class of every epcomm error.");
  g_types.invalid_argument = new_exception(m, "InvalidArgumentError", bases({g_types.base, PyExc_ValueError}),
                                           "A bad shape, dtype, device or value; the message names the argument.");
  g_types.unsupported = new_exception(m, "UnsupportedError", bases({g_types.base, PyExc_NotImplementedError}),
                                      "A feature this build or backend does not provide (yet).");
  g_types.timeout = new_exception(m, "TimeoutError", bases({g_types.base}),
                                  "A peer did not arrive in time; the message names the operation and the peers.");
  g_types.peer_failure =
      new_exception(m, "PeerFailureError", bases({g_types.base}), "A peer reported an error or went away.");
  g_types.out_of_capacity =
      new_exception(m, "OutOfCapacityError", bases({g_types.base}),
                    "The communication buffer (or num_worst_tokens) is too small; states the size needed.");
  g_types.internal = new_exception(m, "InternalError", bases({g_types.base}), "A CUDA or system call failed.");
  g_types.buffer_failed =
      new_exception(m, "BufferFailed", bases({g_types.base}),
                    "An earlier call failed the Buffer (a timeout, a peer failure, a kernel-detected error): every "
                    "later call raises this, naming the first cause, until destroy(); a new Buffer works.");

  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const Error& e) {
      PyErr_SetString(type_for(e.code()), e.what());
    }
  });
}

}  // namespace epcomm::python
