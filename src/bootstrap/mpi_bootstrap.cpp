// The MPI bootstrap (epcomm/mpi_bootstrap.hpp): non-blocking collectives polled against a deadline.
#include "epcomm/mpi_bootstrap.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "core/check.hpp"
#include "core/timeout.hpp"

namespace epcomm {
namespace {

using Clock = std::chrono::steady_clock;

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return concat("MPI error ", code);
  return std::string(text, length);
}

class MpiBootstrap final : public Bootstrap {
 public:
  MpiBootstrap(MPI_Comm comm, std::chrono::milliseconds timeout) : timeout_(timeout) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    require(initialized && !finalized, "mpi_bootstrap", "comm", "MPI is not initialised (call MPI_Init first)");
    require(comm != MPI_COMM_NULL, "mpi_bootstrap", "comm", "expected a communicator, got MPI_COMM_NULL");
    check(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm, &size_), "MPI_Comm_size");
    MPI_Request request;
    check(MPI_Comm_idup(comm, &comm_, &request), "MPI_Comm_idup");
    wait(request, "mpi_bootstrap: MPI_Comm_idup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  }
  ~MpiBootstrap() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    // After a timeout a collective is still pending on comm_: freeing it then is not allowed.
    if (!finalized && unusable_.empty() && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }
  MpiBootstrap(const MpiBootstrap&) = delete;
  MpiBootstrap& operator=(const MpiBootstrap&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  // Every rank first learns every size (so that different sizes are an error naming the ranks,
  // not undefined behaviour inside MPI), then the data moves.
  void all_gather(const void* send, void* recv, size_t bytes) override {
    const std::string op = concat("mpi bootstrap all_gather #", calls_++, " (rank ", rank_, " of ", size_, ")");
    refuse_if_unusable();
    std::vector<uint64_t> sizes(size_);
    const uint64_t mine = bytes;
    collective(op + " (sizes)", [&](MPI_Request* r) {
      return MPI_Iallgather(&mine, 1, MPI_UINT64_T, sizes.data(), 1, MPI_UINT64_T, comm_, r);
    });
    check_same_sizes(op, sizes);
    if (bytes == 0) return;
    require(bytes <= static_cast<size_t>(INT32_MAX), op.c_str(), "bytes", "expected at most ", INT32_MAX, ", got ",
            bytes);
    // MPI forbids a send buffer inside the receive buffer; the interface allows it.
    const auto* from = static_cast<const std::byte*>(send);
    const auto* to = static_cast<const std::byte*>(recv);
    std::vector<std::byte> copy;
    if (from < to + bytes * size_ && to < from + bytes) {
      copy.assign(from, from + bytes);
      from = copy.data();
    }
    collective(op, [&](MPI_Request* r) {
      const int count = static_cast<int>(bytes);
      return MPI_Iallgather(from, count, MPI_BYTE, recv, count, MPI_BYTE, comm_, r);
    });
  }

  void barrier() override {
    const std::string op = concat("mpi bootstrap barrier #", calls_++, " (rank ", rank_, " of ", size_, ")");
    refuse_if_unusable();
    collective(op, [&](MPI_Request* r) { return MPI_Ibarrier(comm_, r); });
  }

 private:
  void check(int status, const char* call) const {
    if (status != MPI_SUCCESS) throw_error(ErrorCode::kInternal, concat(call, " failed: ", mpi_error_text(status)));
  }

  void refuse_if_unusable() const {
    if (!unusable_.empty())
      throw_error(ErrorCode::kPeerFailure, concat("mpi bootstrap: unusable after an earlier failure: ", unusable_));
  }

  template <class Start>
  void collective(const std::string& op, Start start) {
    MPI_Request request;
    const int status = start(&request);
    if (status != MPI_SUCCESS) {
      unusable_ = concat(op, ": ", mpi_error_text(status));
      throw_error(ErrorCode::kPeerFailure, unusable_);
    }
    wait(request, op);
  }

  // Polls `request` until it completes or the timeout passes; spins briefly, then sleeps, so a
  // waiting rank leaves the cores to the late one.
  void wait(MPI_Request& request, const std::string& op) {
    const auto start = Clock::now();
    const Deadline deadline(timeout_);
    for (int polls = 0;; ++polls) {
      int done = 0;
      const int status = MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      if (status != MPI_SUCCESS) {
        unusable_ = concat(op, ": ", mpi_error_text(status));
        throw_error(ErrorCode::kPeerFailure, unusable_);
      }
      if (done) return;
      if (deadline.passed()) {
        const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
        unusable_ = concat(op, ": timed out after ", waited, " ms (MPI cannot say which rank is missing)");
        throw_error(ErrorCode::kTimeout, unusable_);
      }
      if (polls > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  void check_same_sizes(const std::string& op, const std::vector<uint64_t>& sizes) const {
    std::string differing;
    for (int r = 0; r < size_; ++r)
      if (sizes[r] != sizes[0]) differing += concat(differing.empty() ? "" : ", ", "rank ", r, ": ", sizes[r]);
    require(differing.empty(), op.c_str(), "bytes",
            concat("every rank must contribute the same number of bytes; rank 0: ", sizes[0], ", ", differing));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  std::chrono::milliseconds timeout_;
  uint64_t calls_ = 0;
  std::string unusable_;  // why later calls are refused
};

}  // namespace

std::unique_ptr<Bootstrap> mpi_bootstrap(MPI_Comm comm, std::chrono::milliseconds timeout) {
  return std::make_unique<MpiBootstrap>(comm, resolve_timeout(timeout));
}

}  // namespace epcomm
