// The fail-safe fuzz test (test_failsafe_fuzz.cpp): one step of each mode, in their own files since
// the normal-mode and low-latency references each define their own RankInputs.
#pragma once

#include <cstdint>

#include "epcomm/buffer.hpp"

namespace epcomm::testing::fuzz {

// One step, the same on every rank: `seed` draws the sizes, the call and the corruption.
struct Step {
  uint64_t seed = 0;
  int bad_rank = -1;  // -1: a valid step; else the rank whose input is corrupted
};

struct Counts {
  int64_t cases = 0;     // calls made (valid and bad)
  int64_t rejected = 0;  // bad calls every expectation of which held on this rank
};

// Memory for the largest step of either mode, both modes on.
BufferOptions buffer_options(int num_ranks);
int64_t nvl_bytes(int num_ranks);
int64_t rdma_bytes(int num_ranks);

// A valid step: calls of every kind of the mode, each result checked against the CPU reference.
// A bad step: one call with one rank's input corrupted; that rank must raise an error naming the
// argument, every other rank "rank r rejected its inputs", nobody's Buffer fails; then a valid step.
void normal_step(Buffer& buffer, const Step& step, Counts& counts);
void low_latency_step(Buffer& buffer, const Step& step, Counts& counts);

}  // namespace epcomm::testing::fuzz
