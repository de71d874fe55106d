#include "core/environment.hpp"

#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/check.hpp"
#include "core/timeout.hpp"

namespace epcomm {
namespace {

constexpr double kMaxTimeoutSeconds = double(kMaxTimeout.count()) / 1000.0;
constexpr double kIntMax = INT32_MAX;

constexpr EnvVariable kTable[] = {
    {"EPCOMM_TIMEOUT_S", EnvType::kSeconds, "100", 0.001, kMaxTimeoutSeconds, "core",
     "Longest any wait for a peer may take, in seconds, when BufferOptions::timeout (Python: timeout_s) is "
     "not given; also the bootstrap's timeout."},
    {"EPCOMM_WORLD_SIZE", EnvType::kInt, "required by bootstrap_from_env()", 1, kIntMax, "core",
     "Number of ranks of the job (set by epcomm-run)."},
    {"EPCOMM_RANK", EnvType::kInt, "required by bootstrap_from_env()", 0, kIntMax - 1, "core",
     "This process's rank, 0 .. EPCOMM_WORLD_SIZE - 1 (set by epcomm-run)."},
    {"EPCOMM_BOOTSTRAP", EnvType::kText, "required by bootstrap_from_env()", 0, 0, "core",
     "Address of the bootstrap server: unix:@<abstract name> (set by epcomm-run) or tcp:<host>:<port>."},
    {"EPCOMM_BOOTSTRAP_SECRET", EnvType::kText, "set by epcomm-run; TCP: derived from the job", 0, 0, "core",
     "Secret a rank presents to the bootstrap server; the server refuses a hello without it."},
    {"EPCOMM_BOOTSTRAP_PORT", EnvType::kInt, "MASTER_PORT + 1", 1, 65535, "core",
     "Port of rank 0's bootstrap server for tcp_bootstrap_from_env()."},
    {"EPCOMM_JOB_STATUS_FD", EnvType::kInt, "set by epcomm-run", 0, kIntMax, "core",
     "Descriptor of epcomm-run's job-status page (a memfd): the CPU backend's waits learn from it that a "
     "peer exited."},
    {"EPCOMM_RANKS_PER_NODE", EnvType::kInt, "unset", 1, kIntMax, "core",
     "G, ranks per NVLink domain, when BufferOptions::ranks_per_node (Python: ranks_per_node) is 0 / not "
     "given (capped at R); else LOCAL_WORLD_SIZE; else the C++ Buffer puts every rank in one node."},
    {"RANK", EnvType::kInt, "required by tcp_bootstrap_from_env() (or SLURM_PROCID)", 0, kIntMax - 1, "core",
     "torchrun's rank of this process."},
    {"WORLD_SIZE", EnvType::kInt, "required by tcp_bootstrap_from_env() (or SLURM_NTASKS)", 1, kIntMax, "core",
     "torchrun's number of ranks."},
    {"LOCAL_WORLD_SIZE", EnvType::kInt, "unset", 1, kIntMax, "core",
     "torchrun's ranks on this host: the node size G when ranks_per_node and EPCOMM_RANKS_PER_NODE are not "
     "given."},
    {"MASTER_ADDR", EnvType::kText, "required by tcp_bootstrap_from_env()", 0, 0, "core",
     "Host of rank 0 (torchrun / SLURM scripts)."},
    {"MASTER_PORT", EnvType::kInt, "required by tcp_bootstrap_from_env() unless EPCOMM_BOOTSTRAP_PORT", 1, 65534,
     "core", "torch.distributed's store port; epcomm's TCP bootstrap listens on the next one."},
    {"SLURM_PROCID", EnvType::kInt, "unset", 0, kIntMax - 1, "core", "The rank under srun when RANK is unset."},
    {"SLURM_NTASKS", EnvType::kInt, "unset", 1, kIntMax, "core", "The size under srun when WORLD_SIZE is unset."},
    {"TORCHELASTIC_RUN_ID", EnvType::kText, "unset", 0, 0, "core",
     "Part of the TCP bootstrap's derived secret when EPCOMM_BOOTSTRAP_SECRET is unset."},
    {"SLURM_JOB_ID", EnvType::kText, "unset", 0, 0, "core", "Part of the TCP bootstrap's derived secret."},
    {"SLURM_STEP_ID", EnvType::kText, "unset", 0, 0, "core", "Part of the TCP bootstrap's derived secret."},
    {"EPCOMM_LOCAL_RANK", EnvType::kInt, "set by epcomm-run", 0, kIntMax - 1, "launcher",
     "The rank on this machine (equal to EPCOMM_RANK); set for programs that pick a GPU by it."},
    {"EPCOMM_LOCAL_WORLD_SIZE", EnvType::kInt, "set by epcomm-run", 1, kIntMax, "launcher",
     "Ranks on this machine (equal to EPCOMM_WORLD_SIZE); set for programs and the Python front end."},
    {"EPCOMM_LL_PDL", EnvType::kFlag, "1", 0, 1, "cuda",
     "1: low-latency receive kernels are launched as programmatic dependents of their send kernels "
     "(overlap); 0: plain stream order."},
    {"EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS", EnvType::kInt, "64", 0, kIntMax, "cuda",
     "A low-latency dispatch receive overlaps its send only while num_max_dispatch_tokens_per_rank is at "
     "most this (beyond, the send is bandwidth-bound; bench/results/NOTES.md)."},
    {"EPCOMM_LL_PUT_PATH", EnvType::kText, "auto", 0, 0, "cuda",
     "Low-latency peers that get NVSHMEM puts instead of NVLink stores when BufferOptions::low_latency_put_path "
     "is kAuto: auto (peers of other nodes and unmapped peers), mapped (only unmapped peers), all."},
    {"NVSHMEM_SYMMETRIC_SIZE", EnvType::kText, "set by epcomm from num_rdma_bytes", 0, 0, "cuda",
     "NVSHMEM's own heap size; epcomm sets it before initialising NVSHMEM unless the user did, and then "
     "checks that it holds num_rdma_bytes."},
    {"EPCOMM_COMMIT", EnvType::kText, "the git commit of the build", 0, 0, "bench",
     "The commit epcomm-bench writes into its results."},
    {"EPCOMM_TEST_SHM_FAULT", EnvType::kText, "unset (no fault)", 0, 0, "test hook",
     "Test hook of the CPU backend: `after_create` or `after_open` kills the process (SIGKILL) at that step "
     "of mapping the shared segments, for the tests that check nothing is left in /dev/shm."},
};

// strtod / strtoll skip leading blanks; a value with them is as malformed as one with trailing ones.
bool starts_blank(const std::string& text) {
  return !text.empty() && std::isspace(static_cast<unsigned char>(text[0]));
}

[[noreturn]] void reject(const EnvVariable& variable, const char* expected, const std::string& text) {
  throw_error(ErrorCode::kInvalidArgument, concat(variable.name, ": expected ", expected, ", got '", text, "'"));
}

// Whole numbers as integers ("31536000", not "3.1536e+07").
std::string number_text(double value) {
  if (value == std::floor(value) && std::fabs(value) < 1e15) return concat(static_cast<int64_t>(value));
  return concat(value);
}

std::string range_text(const EnvVariable& variable, const char* what) {
  return concat(what, " in [", number_text(variable.min), ", ", number_text(variable.max), "]");
}

// Every read goes through the table, with the type it declares.
const char* raw(const char* name, EnvType type) {
  if (environment_variable(name).type != type)
    throw_error(ErrorCode::kInternal, concat("environment: ", name, " is read with another type than declared"));
  const char* text = std::getenv(name);
  return text != nullptr && *text != '\0' ? text : nullptr;
}

}  // namespace

std::span<const EnvVariable> environment_table() { return kTable; }

const EnvVariable& environment_variable(const char* name) {
  for (const EnvVariable& variable : kTable)
    if (std::strcmp(variable.name, name) == 0) return variable;
  throw_error(ErrorCode::kInternal, concat("environment: ", name, " is not declared in core/environment.cpp"));
}

double parse_seconds(const EnvVariable& variable, const std::string& text) {
  const std::string expected = range_text(variable, "a number of seconds");
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  // strtod accepts "inf" and "nan": both are rejected by the range test (nan compares false).
  if (text.empty() || starts_blank(text) || end != text.c_str() + text.size() || errno == ERANGE ||
      !std::isfinite(value) || !(value >= variable.min && value <= variable.max))
    reject(variable, expected.c_str(), text);
  return value;
}

int64_t parse_int(const EnvVariable& variable, const std::string& text) {
  const std::string expected = range_text(variable, "an integer");
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || starts_blank(text) || end != text.c_str() + text.size() || errno == ERANGE ||
      double(value) < variable.min || double(value) > variable.max)
    reject(variable, expected.c_str(), text);
  return value;
}

bool parse_flag(const EnvVariable& variable, const std::string& text) {
  if (text == "0") return false;
  if (text == "1") return true;
  reject(variable, "0 or 1", text);
}

std::optional<std::string> env_text(const char* name) {
  const char* text = raw(name, EnvType::kText);
  if (text == nullptr) return std::nullopt;
  return std::string(text);
}

std::optional<double> env_seconds(const char* name) {
  const char* text = raw(name, EnvType::kSeconds);
  if (text == nullptr) return std::nullopt;
  return parse_seconds(environment_variable(name), text);
}

std::optional<int64_t> env_int(const char* name) {
  const char* text = raw(name, EnvType::kInt);
  if (text == nullptr) return std::nullopt;
  return parse_int(environment_variable(name), text);
}

std::optional<bool> env_flag(const char* name) {
  const char* text = raw(name, EnvType::kFlag);
  if (text == nullptr) return std::nullopt;
  return parse_flag(environment_variable(name), text);
}

}  // namespace epcomm
