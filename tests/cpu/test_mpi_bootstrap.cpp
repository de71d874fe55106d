// The MPI bootstrap (epcomm/mpi_bootstrap.hpp), run by ctest under `mpirun -n 4`: every byte of
// all_gather in place, different sizes named on every rank, barrier order, and a bounded timeout.
// One process per rank: gtest runs in each, and a failure on any rank fails the run.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "epcomm/error.hpp"
#include "epcomm/mpi_bootstrap.hpp"

namespace epcomm {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

uint64_t shared_seed() {  // fresh per run, the same on every rank
  uint64_t seed = std::random_device{}();
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  return seed;
}

uint8_t pattern(uint64_t seed, int round, int rank, size_t i) {
  uint64_t x = seed ^ (uint64_t(round) << 48) ^ (uint64_t(rank) << 40) ^ i;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return static_cast<uint8_t>(x);
}

int64_t ms_since(Clock::time_point start) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - start).count();
}

TEST(MpiBootstrap, AllGatherDeliversEveryByteInRankOrder) {
  auto group = mpi_bootstrap(MPI_COMM_WORLD, std::chrono::seconds(60));
  int world_rank = 0, world_size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  ASSERT_EQ(group->rank(), world_rank);
  ASSERT_EQ(group->size(), world_size);
  const uint64_t seed = shared_seed();
  int round = 0;
  for (size_t bytes : {size_t(8), size_t(0), size_t(1), size_t(4097), size_t(3) << 20}) {
    std::vector<uint8_t> send(bytes), recv(bytes * world_size + 8, 0xA5);
    for (size_t i = 0; i < bytes; ++i) send[i] = pattern(seed, round, world_rank, i);
    group->all_gather(send.data(), recv.data(), bytes);
    for (int r = 0; r < world_size; ++r)
      for (size_t i = 0; i < bytes; ++i)
        ASSERT_EQ(recv[r * bytes + i], pattern(seed, round, r, i))
            << "round " << round << " rank " << r << " byte " << i;
    for (size_t i = bytes * world_size; i < recv.size(); ++i) ASSERT_EQ(recv[i], 0xA5) << "wrote past the end";
    ++round;
  }
  // In place: the contribution at the start of the receive buffer (what single_rank_bootstrap allows).
  std::vector<uint8_t> in_place(64 * world_size);
  for (size_t i = 0; i < 64; ++i) in_place[i] = pattern(seed, 99, world_rank, i);
  group->all_gather(in_place.data(), in_place.data(), 64);
  for (int r = 0; r < world_size; ++r)
    for (size_t i = 0; i < 64; ++i) ASSERT_EQ(in_place[r * 64 + i], pattern(seed, 99, r, i));
}

TEST(MpiBootstrap, DifferentSizesAreAnErrorOnEveryRankAndTheGroupGoesOn) {
  auto group = mpi_bootstrap(MPI_COMM_WORLD, std::chrono::seconds(60));
  const size_t bytes = group->rank() == 1 ? 16 : 8;
  std::vector<char> send(bytes, 'x'), recv(16 * group->size());
  try {
    group->all_gather(send.data(), recv.data(), bytes);
    ADD_FAILURE() << "different sizes were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank 0: 8, rank 1: 16"), std::string::npos) << e.what();
  }
  group->barrier();
}

TEST(MpiBootstrap, NoRankLeavesTheBarrierBeforeTheLastArrives) {
  auto group = mpi_bootstrap(MPI_COMM_WORLD, std::chrono::seconds(60));
  const auto start = Clock::now();
  if (group->rank() == group->size() - 1) std::this_thread::sleep_for(milliseconds(300));
  group->barrier();
  EXPECT_GE(ms_since(start), 280);
}

// A rank 1.5 s late against a 400 ms timeout: the others get kTimeout within bounds and their
// bootstrap refuses later calls; the late rank's barrier then completes the pending ones.
TEST(MpiBootstrap, ALateRankIsATimeoutAndTheBootstrapThenRefusesCalls) {
  auto group = mpi_bootstrap(MPI_COMM_WORLD, milliseconds(400));
  if (group->rank() == 1) {
    std::this_thread::sleep_for(milliseconds(1500));
    EXPECT_NO_THROW(group->barrier());  // the others' requests are still posted: it matches them
    return;
  }
  const auto start = Clock::now();
  try {
    group->barrier();
    ADD_FAILURE() << "the barrier completed without rank 1";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
    EXPECT_NE(std::string(e.what()).find("mpi bootstrap barrier #0"), std::string::npos) << e.what();
  }
  EXPECT_GE(ms_since(start), 380);
  EXPECT_LT(ms_since(start), 1400) << "the wait is not bounded";
  try {
    group->barrier();
    ADD_FAILURE() << "a call after the timeout was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kPeerFailure) << e.what();
    EXPECT_NE(std::string(e.what()).find("unusable after an earlier failure"), std::string::npos) << e.what();
  }
}

TEST(MpiBootstrap, ANullCommunicatorIsNamed) {
  try {
    mpi_bootstrap(MPI_COMM_NULL);
    ADD_FAILURE() << "MPI_COMM_NULL was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("MPI_COMM_NULL"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace epcomm

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0)
    delete ::testing::UnitTest::GetInstance()->listeners().Release(
        ::testing::UnitTest::GetInstance()->listeners().default_result_printer());
  const int failed = RUN_ALL_TESTS();
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any_failed && !failed) std::printf("rank %d passed, another rank failed\n", rank);
  MPI_Finalize();
  return any_failed ? 1 : 0;
}
