// A dispatch -> (identity expert) -> combine round trip with the C++ API, on the CPU backend.
//
//   build/tools/epcomm-run -n 4 build/examples/epcomm_example_round_trip
//   mpirun -n 4 build/examples/epcomm_example_round_trip           (when built with MPI)
//   scripts/tcp_local_run.sh 4 build/examples/epcomm_example_round_trip   (torchrun's variables)
//
// The bootstrap comes from the environment: epcomm-run's, else MPI's, else torchrun's / srun's.
// Every token goes to the ranks of its top-k experts; each rank sends the rows back unchanged, so
// combine must return x times the number of ranks the token went to. Prints one line per rank.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <epcomm/epcomm.hpp>
#include <memory>
#include <random>
#include <vector>
#ifdef EPCOMM_EXAMPLE_WITH_MPI
#include <epcomm/mpi_bootstrap.hpp>
#endif

namespace {

uint16_t to_bf16(float value) {  // exact for the small integers used here
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t bf16) {
  const uint32_t bits = uint32_t(bf16) << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

bool set(const char* name) { return std::getenv(name) != nullptr; }

// Which launcher started us, from the variables each one sets.
std::unique_ptr<epcomm::Bootstrap> bootstrap_from_launcher(int& argc, char**& argv) {
  if (set("EPCOMM_BOOTSTRAP")) return epcomm::bootstrap_from_env();  // epcomm-run
#ifdef EPCOMM_EXAMPLE_WITH_MPI
  if (set("OMPI_COMM_WORLD_SIZE") || set("PMI_SIZE") || set("PMIX_RANK")) {  // mpirun (Open MPI, MPICH)
    MPI_Init(&argc, &argv);
    return epcomm::mpi_bootstrap(MPI_COMM_WORLD);
  }
#endif
  (void)argc, (void)argv;
  if (set("MASTER_ADDR")) return epcomm::tcp_bootstrap_from_env();  // torchrun, or srun with MASTER_ADDR
  return epcomm::bootstrap_from_env();                              // names what is missing
}

void finish_launcher() {
#ifdef EPCOMM_EXAMPLE_WITH_MPI
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Finalize();
#endif
}

int run(epcomm::Bootstrap& group);

}  // namespace

int main(int argc, char** argv) {
  int status = 1;
  {
    auto bootstrap = bootstrap_from_launcher(argc, argv);
    status = run(*bootstrap);
  }  // the bootstrap goes before MPI does
  finish_launcher();
  return status;
}

namespace {

int run(epcomm::Bootstrap& group) {
  epcomm::Bootstrap* bootstrap = &group;
  const int rank = bootstrap->rank(), R = bootstrap->size();
  const int T = 64, hidden = 256, K = 4, num_experts = 8 * R;

  epcomm::BufferOptions options;
  options.backend = epcomm::BackendKind::kCpu;
  options.num_nvl_bytes = epcomm::default_dispatch_config(R).nvl_buffer_size_hint(hidden * 2, R);
  epcomm::Buffer buffer(*bootstrap, options);

  // Inputs in our own memory: x[t][h] = rank + t (small integers are exact in bf16).
  std::mt19937 rng(1234 + rank);
  std::vector<uint16_t> x(T * hidden);
  std::vector<int64_t> topk_idx(T * K);
  std::vector<float> topk_weights(T * K, 1.0f / K);
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < hidden; ++h) x[t * hidden + h] = to_bf16(float(rank + t % 16));
    for (int k = 0; k < K; ++k) {  // K distinct random experts
      int64_t e;
      do e = std::uniform_int_distribution<int64_t>(0, num_experts - 1)(rng);
      while (std::find(&topk_idx[t * K], &topk_idx[t * K + k], e) != &topk_idx[t * K + k]);
      topk_idx[t * K + k] = e;
    }
  }
  const epcomm::Device cpu = epcomm::Device::cpu();
  epcomm::DispatchInputs in;
  in.x = epcomm::TensorView::contiguous(x.data(), epcomm::DType::kBFloat16, {T, hidden}, cpu);
  in.topk_idx = epcomm::TensorView::contiguous(topk_idx.data(), epcomm::DType::kInt64, {T, K}, cpu);
  in.topk_weights = epcomm::TensorView::contiguous(topk_weights.data(), epcomm::DType::kFloat32, {T, K}, cpu);
  in.num_experts = num_experts;
  const epcomm::DispatchResult d = buffer.dispatch(in);

  // The "expert": hand the received rows straight back.
  epcomm::CombineInputs back;
  back.x = d.recv_x;
  back.handle = d.handle.get();
  const epcomm::CombineResult c = buffer.combine(back);

  // Check: combined = x * (number of ranks the token went to).
  const bool* in_rank = d.handle->is_token_in_rank.data_as<bool>();
  int wrong = 0;
  for (int t = 0; t < T; ++t) {
    int copies = 0;
    for (int r = 0; r < R; ++r) copies += in_rank[t * R + r];
    const float expected = float(rank + t % 16) * float(copies);
    for (int h = 0; h < hidden; ++h) wrong += from_bf16(c.combined_x.data_as<uint16_t>()[t * hidden + h]) != expected;
  }
  std::printf("rank %d of %d: received %d tokens, per local expert:", rank, R, d.handle->num_recv_tokens);
  for (int count : d.num_recv_tokens_per_expert) std::printf(" %d", count);
  std::printf("; round trip %s\n", wrong == 0 ? "exact" : "WRONG");
  buffer.destroy();
  return wrong == 0 ? 0 : 1;
}

}  // namespace
