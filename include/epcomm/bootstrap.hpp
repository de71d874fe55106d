// How the ranks of a group find each other: the only thing epcomm needs from the outside world.
//
// A Bootstrap is used while a Buffer is created and destroyed (to exchange memory handles and
// check arguments) and never on the data path. Implement it over MPI, torch.distributed, a key-value
// store, ...; epcomm ships one for processes started by `epcomm-run` (bootstrap_from_env).
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>

namespace epcomm {

class Bootstrap {
 public:
  virtual ~Bootstrap() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Collective: every rank contributes `bytes` bytes from `send`; `recv` receives size() * bytes
  // bytes, rank r's contribution at offset r * bytes. Throws epcomm::Error on timeout or failure.
  virtual void all_gather(const void* send, void* recv, size_t bytes) = 0;
  // Collective: returns once every rank has entered it.
  virtual void barrier() = 0;
};

// The bootstrap of a process started by `epcomm-run` (reads EPCOMM_RANK, EPCOMM_WORLD_SIZE and
// EPCOMM_BOOTSTRAP from the environment). Throws epcomm::Error(kInvalidArgument) when they are
// missing. Collectives that do not complete within `timeout` (0: $EPCOMM_TIMEOUT_S, else 100 s)
// throw epcomm::Error(kTimeout).
std::unique_ptr<Bootstrap> bootstrap_from_env(std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

// A one-rank group (rank 0 of 1): handy for single-process use and tests.
std::unique_ptr<Bootstrap> single_rank_bootstrap();

}  // namespace epcomm
