// A tiny program for the epcomm-run tests. Every rank prints a greeting and takes part in a
// barrier, then does what the arguments ask:
//   run_probe ok                      all ranks exit 0
//   run_probe exit <rank> <code>      <rank> prints a few lines and exits with <code>; the others
//                                     wait in a barrier and must see kPeerFailure (then exit 0)
//   run_probe crash <rank>            <rank> aborts (SIGABRT); the others as above
//   run_probe hang <rank>             <rank> sleeps forever (for --timeout)
//   run_probe env                     each rank prints its EPCOMM_* variables
//   run_probe leave <rank>            every rank makes a CPU Buffer; <rank> exits 0 without
//                                     destroy(), the others' destroy() must fail with kPeerFailure
//                                     naming it at once (their timeout is 60 s)
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "epcomm/bootstrap.hpp"
#include "epcomm/epcomm.hpp"
#include "epcomm/error.hpp"

namespace {

int wait_for_peer_failure(epcomm::Bootstrap& group) {
  try {
    group.barrier();
  } catch (const epcomm::Error& e) {
    std::printf("rank %d saw: %s\n", group.rank(), e.what());
    return e.code() == epcomm::ErrorCode::kPeerFailure ? 0 : 10;
  }
  std::printf("rank %d: the barrier completed although a rank left\n", group.rank());
  return 11;
}

// Under epcomm-run (exec'd, unlike run_ranks' forked ranks) the job-status page must reach the rank.
int leave_without_destroy(epcomm::Bootstrap& group, int target) {
  epcomm::BufferOptions options;
  options.backend = epcomm::BackendKind::kCpu;
  options.num_nvl_bytes = 1 << 16;
  options.timeout = std::chrono::seconds(60);
  epcomm::Buffer buffer(group, options);
  if (group.rank() == target) return 0;  // the Buffer's destructor only releases it
  const auto start = std::chrono::steady_clock::now();
  try {
    buffer.destroy();
  } catch (const epcomm::Error& e) {
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
    std::printf("rank %d saw after %lld ms: %s\n", group.rank(), static_cast<long long>(ms), e.what());
    return e.code() == epcomm::ErrorCode::kPeerFailure && ms < 10000 ? 0 : 12;
  }
  std::printf("rank %d: destroy completed although rank %d left\n", group.rank(), target);
  return 13;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "ok";
  const int target = argc > 2 ? std::atoi(argv[2]) : -1;
  auto group = epcomm::bootstrap_from_env(std::chrono::seconds(30));
  std::printf("hello from rank %d of %d\n", group->rank(), group->size());
  std::fflush(stdout);
  group->barrier();
  if (mode == "ok") {
    std::fprintf(stderr, "rank %d done\n", group->rank());
    return 0;
  }
  if (mode == "env") {
    for (const char* name : {"EPCOMM_RANK", "EPCOMM_WORLD_SIZE", "EPCOMM_LOCAL_RANK", "EPCOMM_LOCAL_WORLD_SIZE"})
      std::printf("%s=%s\n", name, std::getenv(name));
    return 0;
  }
  if (mode == "leave") return leave_without_destroy(*group, target);
  if (group->rank() != target) return wait_for_peer_failure(*group);
  if (mode == "exit") {
    for (int i = 0; i < 60; ++i) std::printf("line %d of the failing rank\n", i);
    std::fflush(stdout);  // so that the stderr line below comes last in the output
    std::fprintf(stderr, "about to exit with %s\n", argv[3]);
    return std::atoi(argv[3]);
  }
  if (mode == "crash") {
    std::printf("about to abort\n");
    std::fflush(stdout);
    std::abort();
  }
  if (mode == "hang") {
    std::printf("hanging\n");
    std::fflush(stdout);
    for (;;) ::pause();
  }
  std::fprintf(stderr, "run_probe: unknown mode '%s'\n", mode.c_str());
  return 2;
}
