// The fail-safe fuzz test (SPEC §5, issue 11): random bad inputs on random ranks, interleaved with
// valid calls of every kind of both modes on one Buffer; every valid result is checked against the
// CPU reference (tests/reference/normal_reference.*, low_latency_reference.hpp), every bad call must be
// raised by every rank of that call with an error naming the argument, and never fail the Buffer.
//
// Fixed seed. It runs at least kMinSteps steps; EPCOMM_FUZZ_SECONDS=N keeps it going for N seconds.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "failsafe_fuzz.hpp"
#include "support/multirank.hpp"

namespace epcomm::testing {
namespace {

constexpr int kMinSteps = 5000;
constexpr uint64_t kSeed = 20261202;

double fuzz_seconds() {
  const char* value = std::getenv("EPCOMM_FUZZ_SECONDS");
  return value ? std::atof(value) : 0.0;
}

// splitmix64 of (seed, step): the same on every rank.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

void fuzz(int num_ranks) {
  const double seconds = fuzz_seconds();
  RunRanksOptions options;
  options.timeout = std::chrono::seconds(int(seconds) + 300);
  options.print_output_on_success = true;
  run_ranks(
      num_ranks,
      [&](Bootstrap& bootstrap) {
        Buffer buffer(bootstrap, fuzz::buffer_options(num_ranks));
        fuzz::Counts counts;
        const auto start = std::chrono::steady_clock::now();
        for (int step = 0;; ++step) {
          // Rank 0 decides when to stop, so that every rank makes the same calls.
          int32_t more = step < kMinSteps ||
                         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds;
          std::vector<int32_t> all(num_ranks);
          bootstrap.all_gather(&more, all.data(), sizeof(more));
          if (!all[0]) break;
          const uint64_t seed = mix(kSeed + uint64_t(step));
          fuzz::Step s{seed, seed % 5 < 2 ? int((seed >> 8) % uint64_t(num_ranks)) : -1};
          if ((seed >> 16) % 2 == 0) {
            fuzz::normal_step(buffer, s, counts);
          } else {
            fuzz::low_latency_step(buffer, s, counts);
          }
          if (::testing::Test::HasFailure()) {
            std::printf("fuzz: first failure at step %d (seed %llu)\n", step, (unsigned long long)seed);
            break;
          }
        }
        if (bootstrap.rank() == 0)
          std::printf("fuzz: %lld cases, %lld rejected with a named error (%d ranks)\n", (long long)counts.cases,
                      (long long)counts.rejected, num_ranks);
        buffer.destroy();
      },
      options);
}

TEST(FailSafeFuzz, TwoRanks) { fuzz(2); }
TEST(FailSafeFuzz, ThreeRanks) { fuzz(3); }

}  // namespace
}  // namespace epcomm::testing
