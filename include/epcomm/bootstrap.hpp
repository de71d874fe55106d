// How the ranks of a group find each other: the only thing epcomm needs from the outside world.
//
// A Bootstrap is used while a Buffer is created and destroyed (to exchange memory handles and
// check arguments) and never on the data path. Implement it over MPI, torch.distributed, a key-value
// store, ...; epcomm ships one for processes started by `epcomm-run` (bootstrap_from_env), one over
// TCP for ranks on several hosts started by torchrun, srun or a script (tcp_bootstrap_from_env),
// and one over MPI (epcomm/mpi_bootstrap.hpp, library epcomm_mpi, built when CMake finds MPI).
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

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

// The bootstrap of a process started by `epcomm-run` (reads EPCOMM_RANK, EPCOMM_WORLD_SIZE,
// EPCOMM_BOOTSTRAP and EPCOMM_BOOTSTRAP_SECRET from the environment). EPCOMM_BOOTSTRAP may also be
// "tcp:<host>:<port>": then rank 0 serves on <port> as in tcp_bootstrap. Throws
// epcomm::Error(kInvalidArgument) when they are missing. Collectives that do not complete within
// `timeout` (0: $EPCOMM_TIMEOUT_S, else 100 s) throw epcomm::Error(kTimeout); a rank that leaves
// (its connection closes, or epcomm-run sees it exit) fails them at once with kPeerFailure.
std::unique_ptr<Bootstrap> bootstrap_from_env(std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

// A group over TCP, for ranks on one or several hosts. Rank 0 serves: a thread of its process
// listens on `port` (every local address) and the others connect to `host`:`port`, retrying until
// `timeout` while rank 0 is not up yet. Only a rank presenting `secret` is let in (compared in
// constant time; sent in clear over TCP: use a private network). Rank 0 must outlive the others'
// last collective: when it goes, their later calls get kPeerFailure.
std::unique_ptr<Bootstrap> tcp_bootstrap(int rank, int size, const std::string& host, int port,
                                         const std::string& secret,
                                         std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

// tcp_bootstrap from the environment of torchrun or srun:
//   RANK (else SLURM_PROCID), WORLD_SIZE (else SLURM_NTASKS), MASTER_ADDR (rank 0's host),
//   port $EPCOMM_BOOTSTRAP_PORT, else MASTER_PORT + 1 (torchrun's own store listens on MASTER_PORT),
//   secret $EPCOMM_BOOTSTRAP_SECRET, else a token derived from the job (TORCHELASTIC_RUN_ID or
//   SLURM_JOB_ID/SLURM_STEP_ID, address, port, size): it keeps out processes of other jobs, not
//   other users; LOCAL_WORLD_SIZE, when set, is checked to be in [1, WORLD_SIZE].
// Throws epcomm::Error(kInvalidArgument) naming a missing or malformed variable.
std::unique_ptr<Bootstrap> tcp_bootstrap_from_env(std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

// A one-rank group (rank 0 of 1): handy for single-process use and tests.
std::unique_ptr<Bootstrap> single_rank_bootstrap();

}  // namespace epcomm
