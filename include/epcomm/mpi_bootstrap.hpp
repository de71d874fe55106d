// A Bootstrap over MPI, for programs started by mpirun / srun --mpi that already use MPI. Library
// epcomm_mpi (CMake target epcomm::epcomm_mpi), built when CMake finds MPI; link it besides epcomm.
//
//   MPI_Init(&argc, &argv);
//   auto bootstrap = epcomm::mpi_bootstrap(MPI_COMM_WORLD);
//   epcomm::Buffer buffer(*bootstrap, options);
//   ... buffer.destroy(); bootstrap.reset(); MPI_Finalize();
#pragma once

#include <mpi.h>

#include <chrono>
#include <memory>

#include "epcomm/bootstrap.hpp"

namespace epcomm {

// A group of the ranks of `comm` (MPI must be initialised, and stay so while the Bootstrap lives).
// It works on its own duplicate of `comm` (MPI_Comm_idup), so its collectives never match the
// program's own, and with MPI_ERRORS_RETURN on it, so an MPI error becomes an epcomm::Error.
//
// Bounded waits: all_gather and barrier are non-blocking MPI collectives (MPI_Iallgather,
// MPI_Ibarrier) polled with MPI_Test until `timeout` (0: $EPCOMM_TIMEOUT_S, else 100 s); past it
// they throw Error(kTimeout). MPI offers no way to cancel a collective, so after a timeout the
// request stays pending: the Bootstrap refuses every later call (a kPeerFailure naming the first
// failure) and the program should end with MPI_Abort. A rank that dies is MPI's to report: most
// implementations abort the whole job.
std::unique_ptr<Bootstrap> mpi_bootstrap(MPI_Comm comm = MPI_COMM_WORLD,
                                         std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

}  // namespace epcomm
