// epcomm-probes: what the hardware gives SM-driven communication (issue 13, "measure first"); see
// bench/probes/README.md. Every GPU visible takes part at once: for write and read rates each GPU
// spreads its blocks over all its peers (all pairs at once) and over its own HBM ("local"); for
// latency, GPU 0 ping-pongs with each peer, and two blocks of one GPU ping-pong with each other.
// With one GPU only the local figures and the same-GPU latency exist: the output says so.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels.cuh"

namespace epcomm::probes {
namespace {

struct Args {
  std::string json_path;
  bool quick = false;
  int64_t mb_per_block = 4;
  int reps = 3;
};

const char* const kUsage = R"(usage: epcomm-probes [--json FILE] [--quick] [--mb-per-block N] [--reps N]
  --json FILE        one JSON object per line (bench/probes/README.md); also printed as a table
  --quick            fewer combinations (a smoke run)
  --mb-per-block N   MiB each block writes or reads per measurement (default 4)
  --reps N           launches per figure, the fastest is kept (default 3)
)";

bool check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return true;
  std::fprintf(stderr, "epcomm-probes: %s: %s\n", what, cudaGetErrorString(status));
  return false;
}

void require(cudaError_t status, const char* what) {
  if (!check(status, what)) std::exit(1);
}

class Output {
 public:
  explicit Output(const std::string& path) {
    if (!path.empty()) {
      file_ = std::fopen(path.c_str(), "w");
      if (file_ == nullptr) {
        std::fprintf(stderr, "epcomm-probes: --json: cannot open %s\n", path.c_str());
        std::exit(2);
      }
    }
  }
  ~Output() {
    if (file_ != nullptr) std::fclose(file_);
  }
  void row(const std::string& json, const std::string& text) {
    std::printf("%s\n", text.c_str());
    std::fflush(stdout);
    if (file_ != nullptr) {
      std::fprintf(file_, "%s\n", json.c_str());
      std::fflush(file_);
    }
  }

 private:
  std::FILE* file_ = nullptr;
};

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char text[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(text, sizeof(text), fmt, args);
  va_end(args);
  return text;
}

struct Gpu {
  int index = 0;
  int sms = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  uint8_t* landing = nullptr;  // what the other GPUs write into (and read from): one region per source
};

class Machine {
 public:
  Machine(int count, int64_t bytes_per_block) : bytes_per_block_(bytes_per_block), gpus_(count) {
    for (int g = 0; g < count; ++g) {
      Gpu& gpu = gpus_[g];
      gpu.index = g;
      require(cudaSetDevice(g), "cudaSetDevice");
      require(cudaDeviceGetAttribute(&gpu.sms, cudaDevAttrMultiProcessorCount, g), "cudaDeviceGetAttribute");
      max_sms_ = std::max(max_sms_, gpu.sms);
      require(cudaStreamCreateWithFlags(&gpu.stream, cudaStreamNonBlocking), "cudaStreamCreate");
      require(cudaEventCreate(&gpu.start), "cudaEventCreate");
      require(cudaEventCreate(&gpu.stop), "cudaEventCreate");
      for (int peer = 0; peer < count; ++peer) {
        if (peer == g) continue;
        int can = 0;
        require(cudaDeviceCanAccessPeer(&can, g, peer), "cudaDeviceCanAccessPeer");
        if (!can) {
          std::fprintf(stderr, "epcomm-probes: GPU %d cannot access GPU %d (no P2P): peer figures need P2P\n", g, peer);
          std::exit(1);
        }
        const cudaError_t status = cudaDeviceEnablePeerAccess(peer, 0);
        if (status != cudaErrorPeerAccessAlreadyEnabled) require(status, "cudaDeviceEnablePeerAccess");
        (void)cudaGetLastError();
      }
    }
    for (Gpu& gpu : gpus_) {
      require(cudaSetDevice(gpu.index), "cudaSetDevice");
      require(cudaMalloc(&gpu.landing, size_t(region_bytes()) * gpus_.size()), "cudaMalloc (landing buffer)");
      require(cudaMemset(gpu.landing, 0, size_t(region_bytes()) * gpus_.size()), "cudaMemset");
    }
  }

  int count() const { return int(gpus_.size()); }
  int max_sms() const { return max_sms_; }
  Gpu& gpu(int g) { return gpus_[g]; }
  int64_t bytes_per_block() const { return bytes_per_block_; }

  // The targets of source GPU `src`: its region in every peer's landing buffer, or in its own.
  Targets targets(int src, bool peers) const {
    Targets t{};
    t.bytes_per_block = bytes_per_block_;
    for (int g = 0; g < count(); ++g) {
      if (peers == (g == src)) continue;
      t.base[t.count++] = gpus_[g].landing + region_bytes() * src;
    }
    return t;
  }

  // Runs launch(gpu) on every GPU at once, `reps` times; the fastest microseconds per GPU (< 0 when
  // the launch was refused).
  std::vector<double> time_all(int reps, const std::function<bool(Gpu&)>& launch) {
    std::vector<double> best(count(), -1.0);
    for (int r = 0; r < reps; ++r) {
      std::vector<bool> launched(count(), false);
      for (Gpu& gpu : gpus_) {
        require(cudaSetDevice(gpu.index), "cudaSetDevice");
        require(cudaEventRecord(gpu.start, gpu.stream), "cudaEventRecord");
        launched[gpu.index] = launch(gpu);
        require(cudaEventRecord(gpu.stop, gpu.stream), "cudaEventRecord");
      }
      for (Gpu& gpu : gpus_) {
        require(cudaSetDevice(gpu.index), "cudaSetDevice");
        require(cudaStreamSynchronize(gpu.stream), "kernel");
        float ms = 0;
        require(cudaEventElapsedTime(&ms, gpu.start, gpu.stop), "cudaEventElapsedTime");
        if (!launched[gpu.index]) continue;
        const double us = double(ms) * 1e3;
        if (best[gpu.index] < 0 || us < best[gpu.index]) best[gpu.index] = us;
      }
    }
    return best;
  }

 private:
  int64_t region_bytes() const { return int64_t(max_sms_) * bytes_per_block_; }
  int64_t bytes_per_block_;
  int max_sms_ = 0;
  std::vector<Gpu> gpus_;
};

// One row per GPU of a rate measurement.
void report_rates(Output& out, Machine& m, const std::string& probe, const std::string& params_json,
                  const std::string& params_text, const char* pattern, int blocks, const std::vector<double>& us) {
  for (int g = 0; g < m.count(); ++g) {
    if (us[g] < 0) continue;
    const double bytes = double(blocks) * double(m.bytes_per_block());
    const double gbps = bytes / us[g] / 1e3;
    out.row(
        format("{\"probe\": \"%s\", \"gpus\": %d, \"gpu\": %d, \"pattern\": \"%s\", \"sms\": %d, %s, "
               "\"bytes\": %.0f, \"time_us\": %.2f, \"gbps\": %.2f, \"gbps_per_sm\": %.3f}",
               probe.c_str(), m.count(), g, pattern, blocks, params_json.c_str(), bytes, us[g], gbps, gbps / blocks),
        format("  %-10s gpu %d %-6s %3d SMs %-34s %9.1f us %8.1f GB/s %6.2f GB/s/SM", probe.c_str(), g, pattern, blocks,
               params_text.c_str(), us[g], gbps, gbps / blocks));
  }
}

std::vector<int> sm_counts(const Machine& m, bool quick) {
  std::vector<int> counts = quick ? std::vector<int>{8, 32} : std::vector<int>{8, 16, 24, 32};
  counts.push_back(m.max_sms());
  counts.erase(std::remove_if(counts.begin(), counts.end(), [&](int c) { return c > m.max_sms(); }), counts.end());
  std::sort(counts.begin(), counts.end());
  counts.erase(std::unique(counts.begin(), counts.end()), counts.end());
  return counts;
}

std::vector<std::pair<const char*, bool>> patterns(const Machine& m) {
  std::vector<std::pair<const char*, bool>> p;
  if (m.count() >= 2) p.push_back({"peers", true});
  p.push_back({"local", false});
  return p;
}

void probe_store_v4(Output& out, Machine& m, const Args& a) {
  const std::vector<int> warps = a.quick ? std::vector<int>{8, 32} : std::vector<int>{4, 8, 16, 32};
  const std::vector<int> unrolls = a.quick ? std::vector<int>{1, 4} : std::vector<int>{1, 2, 4, 8};
  for (const auto& [pattern, peers] : patterns(m))
    for (int sms : sm_counts(m, a.quick))
      for (int w : warps)
        for (int u : unrolls) {
          const std::vector<double> us = m.time_all(a.reps, [&](Gpu& g) {
            launch_store_v4(m.targets(g.index, peers), sms, w, u, g.stream);
            return check(cudaGetLastError(), "store_v4");
          });
          report_rates(out, m, "store_v4", format("\"warps\": %d, \"unroll\": %d", w, u),
                       format("warps %2d unroll %d", w, u), pattern, sms, us);
        }
}

void probe_tma_store(Output& out, Machine& m, const Args& a) {
  const std::vector<int> sizes = a.quick ? std::vector<int>{4096, 14336} : std::vector<int>{4096, 8192, 12288, 14336};
  const std::vector<int> issuers = a.quick ? std::vector<int>{1, 4} : std::vector<int>{1, 2, 4};
  const std::vector<int> in_flight = a.quick ? std::vector<int>{2, 4} : std::vector<int>{1, 2, 4, 8};
  const std::vector<int> sms_list = a.quick ? std::vector<int>{8} : std::vector<int>{8, 24};
  for (const auto& [pattern, peers] : patterns(m))
    for (int sms : sms_list)
      for (int size : sizes)
        for (int is : issuers)
          for (int f : in_flight)
            for (bool read_wait : {true, false}) {
              if (size_t(is) * f * size > 227 * 1024) continue;  // does not fit in shared memory
              const std::vector<double> us = m.time_all(a.reps, [&](Gpu& g) {
                return launch_tma_store(m.targets(g.index, peers), sms, size, is, f, read_wait, g.stream);
              });
              report_rates(out, m, "tma_store",
                           format("\"chunk_bytes\": %d, \"issuers\": %d, \"in_flight\": %d, \"wait\": \"%s\"", size, is,
                                  f, read_wait ? "read" : "full"),
                           format("%5d B x%d issuers x%d groups %s", size, is, f, read_wait ? ".read" : "full"),
                           pattern, sms, us);
            }
}

void probe_tma_read(Output& out, Machine& m, const Args& a) {
  const std::vector<int> sizes = a.quick ? std::vector<int>{8192} : std::vector<int>{4096, 8192, 14336};
  const std::vector<int> in_flight = a.quick ? std::vector<int>{4} : std::vector<int>{2, 4, 8};
  for (const auto& [pattern, peers] : patterns(m))
    for (int sms : sm_counts(m, a.quick))
      for (int size : sizes)
        for (int f : in_flight) {
          const std::vector<double> us = m.time_all(
              a.reps, [&](Gpu& g) { return launch_tma_read(m.targets(g.index, peers), sms, size, f, g.stream); });
          report_rates(out, m, "tma_read", format("\"chunk_bytes\": %d, \"in_flight\": %d", size, f),
                       format("%5d B x%d in flight", size, f), pattern, sms, us);
        }
}

// One ping-pong between GPUs `a` and `b` (equal: two blocks of one GPU); one-way ns, < 0 on failure.
double ping_pong_ns(Machine& m, int a, int b, FlagKind kind, int payload, int iterations) {
  const int64_t area = ping_pong_area_bytes(payload);
  uint8_t* areas[2] = {nullptr, nullptr};
  uint64_t* elapsed = nullptr;
  const int owners[2] = {a, b};
  for (int s = 0; s < 2; ++s) {
    require(cudaSetDevice(owners[s]), "cudaSetDevice");
    require(cudaMalloc(&areas[s], area), "cudaMalloc (ping-pong)");
    require(cudaMemset(areas[s], 0, area), "cudaMemset");
  }
  require(cudaSetDevice(a), "cudaSetDevice");
  require(cudaMalloc(&elapsed, sizeof(uint64_t)), "cudaMalloc");
  require(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  PingPong sides[2];
  for (int s = 0; s < 2; ++s) sides[s] = PingPong{areas[s], areas[1 - s], payload, iterations, kind, elapsed};
  if (a == b) {
    launch_ping_pong_pair(sides[0], sides[1], m.gpu(a).stream);
  } else {
    require(cudaSetDevice(b), "cudaSetDevice");
    launch_ping_pong_side(sides[1], 1, m.gpu(b).stream);
    require(cudaSetDevice(a), "cudaSetDevice");
    launch_ping_pong_side(sides[0], 0, m.gpu(a).stream);
  }
  uint64_t ns = ~0ull;
  for (int s : {a, b}) {
    require(cudaSetDevice(s), "cudaSetDevice");
    require(cudaStreamSynchronize(m.gpu(s).stream), "ping-pong kernel");
  }
  require(cudaSetDevice(a), "cudaSetDevice");
  require(cudaMemcpy(&ns, elapsed, sizeof(ns), cudaMemcpyDeviceToHost), "cudaMemcpy");
  for (int s = 0; s < 2; ++s) {
    require(cudaSetDevice(owners[s]), "cudaSetDevice");
    cudaFree(areas[s]);
  }
  cudaSetDevice(a);
  cudaFree(elapsed);
  return ns == ~0ull ? -1.0 : double(ns) / (2.0 * iterations);
}

void probe_flag_latency(Output& out, Machine& m, const Args& a) {
  const int iterations = a.quick ? 500 : 2000;
  std::vector<std::pair<int, int>> pairs = {{0, 0}};
  for (int peer = 1; peer < m.count(); ++peer) pairs.push_back({0, peer});
  for (const auto& [x, y] : pairs)
    for (FlagKind kind : {FlagKind::kRelease, FlagKind::kDataCarrying})
      for (int payload : {16, 512, 4096}) {
        const char* kind_name = kind == FlagKind::kRelease ? "release" : "data_carrying";
        const std::string pattern = x == y ? "same_gpu" : format("gpu%d-gpu%d", x, y);
        const double ns = ping_pong_ns(m, x, y, kind, payload, iterations);
        out.row(format("{\"probe\": \"flag_latency\", \"gpus\": %d, \"pattern\": \"%s\", \"kind\": \"%s\", "
                       "\"payload_bytes\": %d, \"iterations\": %d, \"one_way_ns\": %s}",
                       m.count(), pattern.c_str(), kind_name, payload, iterations,
                       ns < 0 ? "null" : format("%.1f", ns).c_str()),
                format("  %-12s %-10s %-14s %5d B payload  %s", "flag_latency", pattern.c_str(), kind_name, payload,
                       ns < 0 ? "TIMED OUT" : format("%8.1f ns one way", ns).c_str()));
      }
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "epcomm-probes: %s needs a value\n%s", arg.c_str(), kUsage);
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--json") {
      a.json_path = value();
    } else if (arg == "--quick") {
      a.quick = true;
    } else if (arg == "--mb-per-block") {
      a.mb_per_block = std::atoll(value().c_str());
    } else if (arg == "--reps") {
      a.reps = std::atoi(value().c_str());
    } else if (arg == "-h" || arg == "--help") {
      std::printf("%s", kUsage);
      std::exit(0);
    } else {
      std::fprintf(stderr, "epcomm-probes: unknown argument '%s'\n%s", arg.c_str(), kUsage);
      std::exit(2);
    }
  }
  if (a.mb_per_block < 1 || a.mb_per_block > 64 || a.reps < 1) {
    std::fprintf(stderr, "epcomm-probes: --mb-per-block must be in [1, 64] and --reps >= 1\n");
    std::exit(2);
  }
  return a;
}

}  // namespace
}  // namespace epcomm::probes

int main(int argc, char** argv) {
  using namespace epcomm::probes;
  const Args args = parse(argc, argv);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "epcomm-probes: no CUDA device visible\n");
    return 1;
  }
  count = std::min(count, kMaxTargets + 1);
  Output out(args.json_path);
  cudaDeviceProp properties{};
  cudaGetDeviceProperties(&properties, 0);
  std::printf("epcomm-probes: %d x %s, %lld MiB per block, best of %d\n", count, properties.name,
              static_cast<long long>(args.mb_per_block), args.reps);
  if (count < 2)
    std::printf(
        "NOTE: 1 GPU visible: peer figures (NVLink write/read rates, flags across GPUs) need >= 2 GPUs; "
        "measuring local HBM rates and the flag latency between two blocks of one GPU only\n");
  Machine machine(count, args.mb_per_block << 20);
  probe_flag_latency(out, machine, args);
  probe_store_v4(out, machine, args);
  probe_tma_store(out, machine, args);
  probe_tma_read(out, machine, args);
  return 0;
}
