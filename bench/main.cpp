// epcomm-bench: the project's main job. One command times epcomm's dispatch / combine (normal and
// low-latency modes) and the NCCL all-to-all baseline on the BENCHMARKS.md workloads, checks every
// configuration's first result, prints a table on rank 0 and writes the JSON rows.
#include <cstdio>
#include <cstdlib>

#include "core/check.hpp"
#include "launch.hpp"
#include "modes.hpp"
#include "options.hpp"
#include "platform.hpp"
#include "report.hpp"

namespace epcomm::bench {
namespace {

BackendKind resolve_backend(BackendChoice choice) {
  const bool have_gpu = backend_available(BackendKind::kCuda) && cuda_device_count() > 0;
  if (choice == BackendChoice::kCpu) return BackendKind::kCpu;
  if (choice == BackendChoice::kCuda) {
    require(have_gpu, "epcomm-bench", "--backend cuda",
            backend_available(BackendKind::kCuda) ? "no CUDA device is visible"
                                                  : "this build of epcomm has no CUDA backend");
    return BackendKind::kCuda;
  }
  return have_gpu ? BackendKind::kCuda : BackendKind::kCpu;
}

int default_ranks(BackendKind backend) {
  return backend == BackendKind::kCuda ? cuda_device_count() : kDefaultCpuRanks;
}

void check_workloads(const std::vector<Workload>& workloads, int ranks) {
  for (const Workload& w : workloads)
    require(w.experts % ranks == 0, "epcomm-bench", "-n", "workload ", w.name, " has ", w.experts, " experts, which ",
            ranks, " ranks do not divide");
}

void note_skipped(BenchContext& ctx, const WorkloadData& data, const std::string& what, const std::string& why) {
  if (ctx.rank == 0) ctx.report.note(concat(data.workload.label(), " ", what, ": skipped: ", why));
  progress(ctx, concat(data.workload.label(), " ", what, ": skipped (not supported): ", why));
}

// A mode the backend does not provide for this workload (e.g. low-latency mode without NVSHMEM, a
// T_max beyond its kernels) is noted and skipped: the backend's Limits say so before any call, the
// same on every rank.
void run_mode(BenchContext& ctx, const std::string& what, void (*mode)(BenchContext&, const WorkloadData&),
              std::optional<std::string> (*unsupported)(const Limits&, const Workload&, int),
              const WorkloadData& data) {
  if (const auto why = unsupported(backend_limits(ctx.platform.backend()), data.workload, ctx.ranks))
    return note_skipped(ctx, data, what, *why);
  mode(ctx, data);
}

// The NCCL baseline is part of the bench's own CUDA build (not an epcomm limit).
void run_baseline(BenchContext& ctx, const WorkloadData& data) {
  try {
    run_nccl_baseline(ctx, data);
  } catch (const Error& error) {
    if (error.code() != ErrorCode::kUnsupported) throw;
    note_skipped(ctx, data, "NCCL baseline", error.what());
  }
}

void run_workload(BenchContext& ctx, const Workload& workload) {
  const WorkloadData data = prepare_workload(ctx, workload);
  if (workload.normal_mode) run_mode(ctx, "normal mode", run_normal_mode, normal_mode_unsupported, data);
  if (workload.low_latency) run_mode(ctx, "low-latency mode", run_low_latency_mode, low_latency_mode_unsupported, data);
  if (ctx.platform.backend() == BackendKind::kCuda && ctx.options.baseline) run_baseline(ctx, data);
}

int run_rank(const Options& given, Bootstrap& bootstrap) {
  const BackendKind backend = resolve_backend(given.backend);
  Options options = given;
  if (options.warmup < 0) options.warmup = backend == BackendKind::kCuda ? 10 : 3;
  require(options.ranks == 0 || options.ranks == bootstrap.size(), "epcomm-bench", "-n", options.ranks,
          " ranks asked, but the launcher started ", bootstrap.size());
  const std::vector<Workload> workloads = resolve_workloads(options.workloads, backend == BackendKind::kCuda);
  check_workloads(workloads, bootstrap.size());
  std::unique_ptr<Platform> platform =
      backend == BackendKind::kCuda ? make_cuda_platform(bootstrap, options.flush_bytes) : make_cpu_platform(bootstrap);
  Report report(RunInfo{utc_now(), platform->machine(), commit_id()});
  if (bootstrap.rank() == 0 && !options.json_path.empty()) report.open_json(options.json_path);
  BenchContext ctx{options, *platform, report, bootstrap.rank(), bootstrap.size()};
  progress(ctx, concat("epcomm-bench: ", ctx.ranks, " ranks, backend ", to_string(backend), ", ", report.info().machine,
                       ", commit ", report.info().commit, ", ", options.iters, " iterations (median), ", options.warmup,
                       " warm-up", options.check ? ", results checked" : ", results NOT checked"));
  if (backend == BackendKind::kCpu && options.num_sms_given && ctx.rank == 0)
    report.note("--num-sms is ignored on the CPU backend (rows have num_sms null)");
  if (backend == BackendKind::kCpu && ctx.rank == 0)
    report.note(
        "CPU backend: steady_clock around each (synchronous) call, caches not flushed; for checking the bench, "
        "not for comparison with GPU figures");
  for (const Workload& base : workloads) {
    Workload workload = base;
    if (options.uniform_routing) run_workload(ctx, workload);
    workload.skewed = true;
    if (options.skewed_routing) run_workload(ctx, workload);
  }
  if (ctx.rank == 0) {
    report.print_table(stdout);
    if (!options.json_path.empty())
      std::printf("wrote %zu rows to %s\n", report.rows().size(), options.json_path.c_str());
    if (ctx.failures > 0)
      std::printf("%d configuration(s) FAILED their check: no figure recorded for them\n", ctx.failures);
  }
  bootstrap.barrier();
  return ctx.failures > 0 ? 1 : 0;
}

int bench_main(int argc, const char* const* argv) {
  const Options options = parse_options(argc - 1, argv + 1);
  if (options.help) {
    std::fputs(usage(), stdout);
    return 0;
  }
  if (std::getenv("EPCOMM_RANK") != nullptr) return run_rank(options, *bootstrap_from_env());
  const BackendKind backend = resolve_backend(options.backend);
  const int ranks = options.ranks > 0 ? options.ranks : default_ranks(backend);
  check_workloads(resolve_workloads(options.workloads, backend == BackendKind::kCuda), ranks);  // before launching
  if (ranks == 1) return run_rank(options, *single_rank_bootstrap());
  return launch_ranks(ranks, argc, argv);
}

}  // namespace
}  // namespace epcomm::bench

int main(int argc, char** argv) {
  // NVLink multicast stays off in NCCL (the baseline, the GPU alignment) and NVSHMEM (low-latency
  // mode): set here so that every rank this process launches inherits it too.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/1);
  setenv("NVSHMEM_DISABLE_NVLS", "1", /*overwrite=*/1);
  try {
    return epcomm::bench::bench_main(argc, argv);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 1;
  }
}
