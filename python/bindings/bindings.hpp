// The parts of the epcomm._C module, one function per concern.
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>

#include "epcomm/limits.hpp"

namespace epcomm::python {

void bind_buffer(pybind11::module_& module);   // Buffer, DispatchHandle, config helpers
void bind_events(pybind11::module_& module);   // Event, RecvHook
void bind_library(pybind11::module_& module);  // version, backends, SM count, size hints, dtype codes
void bind_limits(pybind11::module_& module);   // backend_limits (limits_binding.cpp)

// limits_binding.cpp: Limits as a dict; Buffer(timeout_s=...) checked and converted.
pybind11::dict limits_to_dict(const Limits& limits);
std::chrono::milliseconds timeout_from_seconds(double seconds);

}  // namespace epcomm::python
