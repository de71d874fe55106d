// Command line of epcomm-bench (see `epcomm-bench --help` and bench/results/README.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace epcomm::bench {

enum class BackendChoice { kAuto, kCpu, kCuda };

struct Options {
  int ranks = 0;  // -n: ranks to launch; 0 = decided from the backend
  BackendChoice backend = BackendChoice::kAuto;
  std::vector<std::string> workloads;   // empty = the backend's default
  std::vector<int> num_sms{8, 16, 24};  // normal-mode SM counts (CUDA only)
  bool num_sms_given = false;
  int iters = 30;                            // timed iterations per figure (median taken)
  int warmup = -1;                           // untimed iterations before them; -1 = 10 on CUDA, 3 on the CPU
  std::string json_path;                     // --json FILE: the rows of BENCHMARKS.md "Recording results"
  bool uniform_routing = true;               // run the workloads with uniform routing
  bool skewed_routing = false;               // ... and/or with 80/20 skewed routing (--routing)
  bool check = true;                         // compare each configuration's first call against the oracle
  bool baseline = true;                      // time the NCCL all-to-all baseline (CUDA only)
  bool kernel_time = true;                   // also report summed kernel durations (CUPTI, CUDA only)
  uint64_t seed = 1;                         // base of every per-rank seed
  int64_t flush_bytes = int64_t(256) << 20;  // GPU L2 flush buffer written before each timed call
  int nvl_chunk_tokens = 0;                  // --nvl-chunk: Config.num_max_nvl_chunked_send_tokens (0 = default)
  int nvl_queue_tokens = 0;                  // --nvl-queue: Config.num_max_nvl_chunked_recv_tokens (0 = default)
  int ranks_per_node = 0;                    // --ranks-per-node G: normal mode across emulated nodes (0 = default)
  bool help = false;
};

// Parses argv (without argv[0]). Throws epcomm::Error(kInvalidArgument) naming the bad argument.
Options parse_options(int argc, const char* const* argv);
const char* usage();
const char* to_string(BackendChoice backend);

}  // namespace epcomm::bench
