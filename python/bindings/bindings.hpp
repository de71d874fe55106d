// The parts of the epcomm._C module, one function per concern.
#pragma once

#include <pybind11/pybind11.h>

namespace epcomm::python {

void bind_buffer(pybind11::module_& module);   // Buffer, DispatchHandle, config helpers
void bind_events(pybind11::module_& module);   // Event, RecvHook
void bind_library(pybind11::module_& module);  // version, backends, SM count, size hints, dtype codes

}  // namespace epcomm::python
