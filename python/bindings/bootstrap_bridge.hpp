// An epcomm::Bootstrap whose collectives are Python callables (torch.distributed or mpi4py; see
// epcomm/_group.py). Used only while a Buffer is created and destroyed.
#pragma once

#include <pybind11/pybind11.h>

#include "epcomm/bootstrap.hpp"

namespace epcomm::python {

class PyBootstrap final : public Bootstrap {
 public:
  // all_gather(bytes) -> bytes: every rank's contribution concatenated in rank order.
  // barrier() -> None.
  PyBootstrap(int rank, int size, pybind11::object all_gather, pybind11::object barrier);
  ~PyBootstrap() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_gather(const void* send, void* recv, size_t bytes) override;
  void barrier() override;

 private:
  int rank_;
  int size_;
  pybind11::object all_gather_;
  pybind11::object barrier_;
};

}  // namespace epcomm::python
