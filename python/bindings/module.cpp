// epcomm._C: the binding of libepcomm for the PyTorch front end (python/epcomm). It never includes
// PyTorch's C++ headers; see tensor_bridge.hpp for how tensors cross.
#include "bindings.hpp"
#include "errors.hpp"

PYBIND11_MODULE(_C, module) {
  module.doc() = "epcomm's C++ core (libepcomm) as seen by the PyTorch front end. Use the epcomm package instead.";
  epcomm::python::bind_errors(module);
  epcomm::python::bind_library(module);
  epcomm::python::bind_limits(module);
  epcomm::python::bind_events(module);
  epcomm::python::bind_buffer(module);
}
