// Dropping Python references from C++ code that may run without the GIL (deleters of epcomm
// storage run wherever the last epcomm::Tensor dies, torch calls DLPack deleters from anywhere).
#pragma once

#include <pybind11/pybind11.h>

namespace epcomm::python {

inline bool python_is_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Takes the GIL and drops one reference. At interpreter shutdown the reference is leaked instead:
// taking the GIL then is not allowed and the process is about to release everything anyway.
inline void release_python_reference(PyObject* object) {
  if (object == nullptr || !Py_IsInitialized() || python_is_finalizing()) return;
  pybind11::gil_scoped_acquire gil;
  Py_DECREF(object);
}

}  // namespace epcomm::python
