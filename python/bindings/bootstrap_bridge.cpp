#include "bootstrap_bridge.hpp"

#include <cstring>
#include <string>

#include "epcomm/error.hpp"
#include "python_objects.hpp"

namespace epcomm::python {

namespace py = pybind11;

namespace {
// A Python failure inside a collective becomes an epcomm::Error, so that the C++ core sees one
// error model; the message keeps the Python exception's text.
[[noreturn]] void rethrow_as_peer_failure(const char* what, py::error_already_set& e) {
  throw Error(ErrorCode::kPeerFailure, std::string("bootstrap ") + what + " over the Python group failed: " + e.what());
}
}  // namespace

PyBootstrap::PyBootstrap(int rank, int size, py::object all_gather, py::object barrier)
    : rank_(rank), size_(size), all_gather_(std::move(all_gather)), barrier_(std::move(barrier)) {}

PyBootstrap::~PyBootstrap() {
  release_python_reference(all_gather_.release().ptr());
  release_python_reference(barrier_.release().ptr());
}

void PyBootstrap::all_gather(const void* send, void* recv, size_t bytes) {
  py::gil_scoped_acquire gil;
  py::bytes gathered;
  try {
    gathered = all_gather_(py::bytes(static_cast<const char*>(send), bytes));
  } catch (py::error_already_set& e) {
    rethrow_as_peer_failure("all_gather", e);
  }
  char* data = nullptr;
  Py_ssize_t length = 0;
  if (PyBytes_AsStringAndSize(gathered.ptr(), &data, &length) != 0) throw py::error_already_set();
  const size_t expected = bytes * static_cast<size_t>(size_);
  if (static_cast<size_t>(length) != expected)
    throw Error(ErrorCode::kInternal, "bootstrap all_gather: expected " + std::to_string(expected) + " bytes from " +
                                          std::to_string(size_) + " ranks, got " + std::to_string(length));
  std::memcpy(recv, data, expected);
}

void PyBootstrap::barrier() {
  py::gil_scoped_acquire gil;
  try {
    barrier_();
  } catch (py::error_already_set& e) {
    rethrow_as_peer_failure("barrier", e);
  }
}

}  // namespace epcomm::python
