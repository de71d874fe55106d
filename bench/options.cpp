#include "options.hpp"

#include <charconv>
#include <string_view>

#include "core/check.hpp"

namespace epcomm::bench {
namespace {

const char* const kUsage = R"(epcomm-bench: dispatch / combine speed of epcomm and of an NCCL all-to-all baseline.

usage: epcomm-bench [-n RANKS] [--backend cpu|cuda|auto] [--workload W[,W...]] [--num-sms 8,16,24]
                    [--iters N] [--warmup N] [--json FILE] [--routing uniform|skewed|both] [--skewed]
                    [--no-check] [--no-baseline] [--no-kernel-time] [--seed N] [--flush-mb MB]
                    [--nvl-chunk N] [--nvl-queue N] [--ranks-per-node G]

  -n RANKS          launch RANKS local ranks (processes). Default: one per GPU (cuda), 4 (cpu).
                    Under epcomm-run (EPCOMM_RANK set) the process is one rank and -n must match.
  --backend B       cuda: one GPU per rank; cpu: the CPU reference backend; auto (default):
                    cuda when a GPU is present, else cpu.
  --workload W      normal | ll | ll-small | cpu-small | all (= normal,ll,ll-small); a comma list
                    is accepted. Default: all on cuda, cpu-small on cpu. Shapes in BENCHMARKS.md.
                    ll-t<N> (1 <= N <= 1024): the ll shape with N tokens per rank, for sweeps.
  --num-sms LIST    SM counts for normal mode (cuda), default 8,16,24.
  --iters N         timed iterations per figure, median reported (default 30).
  --warmup N        untimed iterations first (default 10 on cuda, 3 on cpu, whose calls are synchronous).
  --json FILE       write one JSON row per figure (BENCHMARKS.md "Recording results"); truncates FILE.
  --routing R       uniform (default): topk of |randn| + 1 per rank; skewed: 20% of the experts get
                    80% of the selections (workload name gets "-skewed"); both.
  --skewed          the same as --routing both.
  --no-check        skip the correctness check of each configuration's first call.
  --no-baseline     skip the NCCL all_to_all baseline.
  --no-kernel-time  skip the kernel-time rows (CUPTI kernel durations summed per call, cuda only;
                    measured in a second pass of the same iterations, so event spans exclude tracing).
  --seed N          base seed of the inputs (default 1).
  --flush-mb MB     size of the buffer written to flush the GPU L2 before each timed call (default 256).
  --nvl-chunk N     normal mode: Config.num_max_nvl_chunked_send_tokens (default: the library's default).
  --nvl-queue N     normal mode: Config.num_max_nvl_chunked_recv_tokens (default: the library's default).
  --ranks-per-node G  normal mode across emulated nodes of G ranks (SPEC 3.6; CPU backend, the CUDA
                    backend has no inter-node normal mode yet): prints the bytes each rank put on the
                    (emulated) network and their ratio to SPEC's minimum. Times on emulated nodes are
                    functional figures, not network figures. Default: $EPCOMM_RANKS_PER_NODE, else
                    $LOCAL_WORLD_SIZE, else one node.
)";

[[noreturn]] void bad(std::string_view arg, const std::string& why) {
  throw_error(ErrorCode::kInvalidArgument, concat("epcomm-bench: ", arg, ": ", why));
}

int64_t parse_int(std::string_view arg, std::string_view text, int64_t min_value) {
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) bad(arg, concat("expected an integer, got '", text, "'"));
  if (value < min_value) bad(arg, concat("expected >= ", min_value, ", got ", value));
  return value;
}

std::vector<std::string> split_list(std::string_view text) {
  std::vector<std::string> items;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = text.find(',', start);
    const size_t end = comma == std::string_view::npos ? text.size() : comma;
    if (end > start) items.emplace_back(text.substr(start, end - start));
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return items;
}

BackendChoice parse_backend(std::string_view text) {
  if (text == "cpu") return BackendChoice::kCpu;
  if (text == "cuda") return BackendChoice::kCuda;
  if (text == "auto") return BackendChoice::kAuto;
  bad("--backend", concat("expected cpu, cuda or auto, got '", text, "'"));
}

std::vector<int> parse_num_sms(std::string_view text) {
  std::vector<int> values;
  for (const std::string& item : split_list(text)) {
    const int64_t sms = parse_int("--num-sms", item, 2);
    if (sms % 2 != 0) bad("--num-sms", concat("SM counts must be even, got ", sms));
    values.push_back(static_cast<int>(sms));
  }
  if (values.empty()) bad("--num-sms", "expected a comma-separated list such as 8,16,24");
  return values;
}

void parse_routing(std::string_view text, Options& options) {
  if (text != "uniform" && text != "skewed" && text != "both")
    bad("--routing", concat("expected uniform, skewed or both, got '", text, "'"));
  options.uniform_routing = text != "skewed";
  options.skewed_routing = text != "uniform";
}

// Options without a value; false when `arg` is not one of them.
bool parse_flag(std::string_view arg, Options& options) {
  if (arg == "-h" || arg == "--help")
    options.help = true;
  else if (arg == "--skewed")
    options.uniform_routing = options.skewed_routing = true;
  else if (arg == "--check")
    options.check = true;
  else if (arg == "--no-check")
    options.check = false;
  else if (arg == "--no-kernel-time")
    options.kernel_time = false;
  else if (arg == "--no-baseline")
    options.baseline = false;
  else
    return false;
  return true;
}

}  // namespace

const char* usage() { return kUsage; }

const char* to_string(BackendChoice backend) {
  switch (backend) {
    case BackendChoice::kCpu:
      return "cpu";
    case BackendChoice::kCuda:
      return "cuda";
    case BackendChoice::kAuto:
      return "auto";
  }
  return "?";
}

Options parse_options(int argc, const char* const* argv) {
  Options options;
  for (int i = 0; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (parse_flag(arg, options)) continue;
    if (i + 1 >= argc) bad(arg, "unknown option, or an option without its value (see --help)");
    const std::string_view value = argv[++i];
    if (arg == "-n" || arg == "--ranks")
      options.ranks = static_cast<int>(parse_int(arg, value, 1));
    else if (arg == "--backend")
      options.backend = parse_backend(value);
    else if (arg == "--workload")
      options.workloads = split_list(value);
    else if (arg == "--num-sms") {
      options.num_sms = parse_num_sms(value);
      options.num_sms_given = true;
    } else if (arg == "--iters")
      options.iters = static_cast<int>(parse_int(arg, value, 1));
    else if (arg == "--warmup")
      options.warmup = static_cast<int>(parse_int(arg, value, 0));
    else if (arg == "--json")
      options.json_path = value;
    else if (arg == "--routing")
      parse_routing(value, options);
    else if (arg == "--seed")
      options.seed = static_cast<uint64_t>(parse_int(arg, value, 0));
    else if (arg == "--flush-mb")
      options.flush_bytes = parse_int(arg, value, 0) << 20;
    else if (arg == "--nvl-chunk")
      options.nvl_chunk_tokens = static_cast<int>(parse_int(arg, value, 1));
    else if (arg == "--nvl-queue")
      options.nvl_queue_tokens = static_cast<int>(parse_int(arg, value, 1));
    else if (arg == "--ranks-per-node")
      options.ranks_per_node = static_cast<int>(parse_int(arg, value, 1));
    else
      bad(arg, "unknown option (see --help)");
  }
  return options;
}

}  // namespace epcomm::bench
