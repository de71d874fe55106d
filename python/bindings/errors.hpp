// epcomm::Error -> Python exceptions, in exactly one place (STYLE: status in the core, exceptions at
// the edge). Every class derives from epcomm.Error (a RuntimeError) and carries the C++ message:
//   kInvalidArgument -> InvalidArgumentError (also a ValueError)
//   kUnsupported     -> UnsupportedError     (also a NotImplementedError)
//   kTimeout         -> TimeoutError
//   kPeerFailure     -> PeerFailureError
//   kOutOfCapacity   -> OutOfCapacityError
//   kInternal        -> InternalError
#pragma once

#include <pybind11/pybind11.h>

namespace epcomm::python {

void bind_errors(pybind11::module_& module);

}  // namespace epcomm::python
