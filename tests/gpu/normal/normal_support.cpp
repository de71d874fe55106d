#include "normal_support.hpp"

#include <algorithm>
#include <cstdlib>
#include <random>
#include <set>
#include <sstream>

#include "core/numerics.hpp"
#include "support/gpu.hpp"

namespace epcomm::testing::normal {
namespace {

constexpr uint8_t kPoison = 0xA5;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
}

std::string describe_element(const uint8_t* bytes, size_t element_size) {
  std::ostringstream out;
  out << "0x" << std::hex;
  for (size_t i = element_size; i-- > 0;) out << (bytes[i] < 16 ? "0" : "") << int(bytes[i]);
  return out.str();
}

TensorView host_view(const void* data, DType dtype, std::initializer_list<int64_t> shape) {
  return TensorView::contiguous(const_cast<void*>(data), dtype, shape, Device::cpu());
}

}  // namespace

std::vector<int> rank_counts() {
  const char* env = std::getenv("EPCOMM_TEST_MAX_RANKS");
  const int limit = env != nullptr ? std::atoi(env) : 8;
  std::vector<int> counts;
  for (int r : {2, 3, 4, 8})
    if (r <= limit) counts.push_back(r);
  return counts;
}

int select_device(int rank) {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  const int device = rank % std::max(count, 1);
  check(cudaSetDevice(device), "cudaSetDevice");
  return device;
}

std::chrono::milliseconds test_timeout() {
  const char* env = std::getenv("EPCOMM_TEST_SHORT_TIMEOUT_S");
  return std::chrono::milliseconds(static_cast<int64_t>((env != nullptr ? std::atof(env) : 3.0) * 1000));
}

Tensor PoisonAllocator::allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) {
  Tensor t = default_allocator().allocate(dtype, shape, device, stream);
  const size_t bytes = t.nbytes();
  if (!device.is_cuda()) {
    std::memset(t.data, kPoison, bytes);
  } else if (bytes > 0) {
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    check(cudaMemsetAsync(t.data, kPoison, bytes, s), "poison cudaMemsetAsync");
    check(cudaStreamSynchronize(s), "poison cudaStreamSynchronize");
  }
  return t;
}

ArenaAllocator::ArenaAllocator(int device, size_t bytes) : device_(device), bytes_(bytes) {
  check(cudaMalloc(reinterpret_cast<void**>(&base_), bytes), "arena cudaMalloc");
}

ArenaAllocator::~ArenaAllocator() { cudaFree(base_); }

Tensor ArenaAllocator::allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle) {
  if (!device.is_cuda() || device.index != device_) throw std::runtime_error("arena: wrong device");
  TensorView view = TensorView::contiguous(nullptr, dtype, shape, device);
  const size_t bytes = (std::max<size_t>(view.nbytes(), 16) + 255) / 256 * 256;
  if (used_ + bytes > bytes_) throw std::runtime_error("arena exhausted");
  view.data = base_ + used_;
  used_ += bytes;
  return Tensor(view, nullptr);
}

void ArenaAllocator::poison() {
  check(cudaMemset(base_, kPoison, bytes_), "arena poison");
  check(cudaDeviceSynchronize(), "arena poison sync");
}

std::vector<uint8_t> contents(const TensorView& t) {
  const size_t element = dtype_size(t.dtype);
  const int64_t rows = t.ndim >= 1 ? t.size(0) : 1;
  const int64_t cols = t.ndim == 2 ? t.size(1) : 1;
  const int64_t row_stride = t.ndim >= 1 ? t.stride(0) : 0;
  const int64_t col_stride = t.ndim == 2 ? t.stride(1) : 0;
  std::vector<uint8_t> out(size_t(rows * cols) * element);
  if (out.empty()) return out;
  // Bring the whole storage the view spans to the host, then gather in logical order.
  const int64_t extent = 1 + (rows - 1) * row_stride + (cols - 1) * col_stride;
  std::vector<uint8_t> storage(size_t(extent) * element);
  if (t.device.is_cuda()) {
    check(cudaDeviceSynchronize(), "contents: cudaDeviceSynchronize");
    check(cudaMemcpy(storage.data(), t.data, storage.size(), cudaMemcpyDeviceToHost), "contents: cudaMemcpy");
  } else {
    std::memcpy(storage.data(), t.data, storage.size());
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      std::memcpy(&out[size_t(i * cols + j) * element], &storage[size_t(i * row_stride + j * col_stride) * element],
                  element);
  return out;
}

void expect_same_rows(const std::string& what, const TensorView& cpu, const TensorView& gpu, int64_t rows) {
  ASSERT_EQ(cpu.ndim, gpu.ndim) << what;
  for (int d = 0; d < cpu.ndim; ++d) ASSERT_EQ(cpu.size(d), gpu.size(d)) << what << ": dim " << d;
  ASSERT_EQ(cpu.dtype, gpu.dtype) << what;
  const std::vector<uint8_t> a = contents(cpu), b = contents(gpu);
  const size_t element = dtype_size(cpu.dtype);
  const int64_t cols = cpu.ndim == 2 ? cpu.size(1) : 1;
  const int64_t total_rows = cpu.ndim >= 1 ? cpu.size(0) : 1;
  const int64_t checked = rows < 0 ? total_rows : std::min(rows, total_rows);
  int64_t mismatches = 0;
  for (int64_t i = 0; i < checked * cols; ++i) {
    if (std::memcmp(&a[size_t(i) * element], &b[size_t(i) * element], element) == 0) continue;
    if (mismatches++ == 0) {
      ADD_FAILURE() << what << ": first difference at [" << i / cols << ", " << i % cols << "]: cpu "
                    << describe_element(&a[size_t(i) * element], element) << ", gpu "
                    << describe_element(&b[size_t(i) * element], element);
    }
  }
  if (mismatches > 0) ADD_FAILURE() << what << ": " << mismatches << " of " << checked * cols << " elements differ";
}

DeviceCopy::DeviceCopy(const void* data, size_t bytes) : bytes_(bytes) {
  check(cudaMalloc(&data_, std::max<size_t>(bytes, 16)), "DeviceCopy cudaMalloc");
  if (bytes > 0 && data != nullptr)
    check(cudaMemcpy(data_, data, bytes, cudaMemcpyHostToDevice), "DeviceCopy cudaMemcpy");
}

DeviceCopy::~DeviceCopy() {
  if (data_ != nullptr) cudaFree(data_);
}

DeviceCopy::DeviceCopy(DeviceCopy&& other) noexcept : data_(other.data_), bytes_(other.bytes_) {
  other.data_ = nullptr;
}

DeviceCopy& DeviceCopy::operator=(DeviceCopy&& other) noexcept {
  std::swap(data_, other.data_);
  std::swap(bytes_, other.bytes_);
  return *this;
}

void DeviceCopy::write(const void* data, size_t bytes) {
  if (bytes != bytes_) throw std::runtime_error("DeviceCopy::write: size changed");
  if (bytes > 0) check(cudaMemcpy(data_, data, bytes, cudaMemcpyHostToDevice), "DeviceCopy::write");
}

Config Case::small_config() {
  Config config;
  config.num_sms = 4;
  config.num_max_nvl_chunked_send_tokens = 3;
  config.num_max_nvl_chunked_recv_tokens = 8;
  return config;
}

std::vector<uint16_t> random_bf16(size_t count, uint64_t seed) {
  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> out(count);
  for (auto& v : out) {
    uint16_t bits = numerics::float_to_bf16(normal(random));
    if ((bits & 0x7FFF) == 0) bits = 0x3C00;  // never zero (0.0078125)
    v = bits;
  }
  return out;
}

RankInputs::RankInputs(const Case& c, int rank, int num_ranks) : case_(c), rank_(rank), num_ranks_(num_ranks) {
  T_ = rank == c.empty_rank ? 0 : c.num_tokens;
  S_ = c.fp8 ? (c.num_scales > 0 ? c.num_scales : c.hidden / 128) : 0;
  generate(c.seed, /*values_only=*/false);
  upload();
}

void RankInputs::generate(uint64_t seed, bool values_only) {
  const int K = case_.num_topk, L = case_.experts_per_rank, E = L * num_ranks_, H = case_.hidden;
  std::mt19937_64 random(seed * 1000003 + rank_ * 7919 + 17);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);

  // x: the first columns name the source (rank + 1, token / 256, token % 256) so that a misrouted row
  // says where it came from; the rest is random.
  const size_t element = case_.fp8 ? 1 : 2;
  x_.assign(size_t(T_) * H * element, 0);
  if (case_.fp8) {
    for (auto& b : x_) {
      b = static_cast<uint8_t>(random() & 0xFF);
      if ((b & 0x7F) == 0x7F || b == 0 || b == 0x80) b = 0x38;  // no NaN, never zero
    }
    for (int t = 0; t < T_; ++t) {
      x_[size_t(t) * H + 0] = static_cast<uint8_t>(rank_ + 1);
      x_[size_t(t) * H + 1] = static_cast<uint8_t>(t / 256 + 1);
      x_[size_t(t) * H + 2] = static_cast<uint8_t>(t % 256);
    }
  } else {
    const std::vector<uint16_t> values = random_bf16(size_t(T_) * H, random());
    std::memcpy(x_.data(), values.data(), values.size() * 2);
    auto* rows = reinterpret_cast<uint16_t*>(x_.data());
    for (int t = 0; t < T_; ++t) {
      rows[size_t(t) * H + 0] = numerics::float_to_bf16(float(rank_ + 1));
      rows[size_t(t) * H + 1] = numerics::float_to_bf16(float(t / 256 + 1));
      rows[size_t(t) * H + 2] = numerics::float_to_bf16(float(t % 256) + 0.5f);
    }
  }
  scales_.assign(size_t(T_) * S_, 0.0f);
  for (int t = 0; t < T_; ++t)
    for (int s = 0; s < S_; ++s) {
      const float value = s == 0 ? float(rank_ * 100000 + t) : 0.001f + unit(random);
      scales_[case_.scales_column_major ? size_t(s) * T_ + t : size_t(t) * S_ + s] = value;
    }
  weights_.assign(size_t(T_) * K, 0.0f);
  for (auto& w : weights_) w = 0.01f + unit(random);
  if (values_only) return;

  // topk_idx: K distinct experts per token (skewed: 80% of picks among rank 0's experts), some -1.
  topk64_.assign(size_t(T_) * K, -1);
  for (int t = 0; t < T_; ++t) {
    std::set<int64_t> chosen;
    for (int k = 0; k < K; ++k) {
      int64_t e;
      do {
        const bool hot = case_.routing == Routing::kSkewed && unit(random) < 0.8f && int(chosen.size()) < L;
        e = hot ? int64_t(random() % L) : int64_t(random() % E);
      } while (chosen.count(e) != 0 && int(chosen.size()) < E);
      chosen.insert(e);
      topk64_[size_t(t) * K + k] = unit(random) < case_.empty_slot_fraction ? -1 : e;
    }
  }
  topk32_.assign(topk64_.begin(), topk64_.end());
}

void RankInputs::upload() {
  x_d_ = DeviceCopy(x_.data(), x_.size());
  scales_d_ = DeviceCopy(scales_.data(), scales_.size() * 4);
  if (case_.int32_idx)
    topk_d_ = DeviceCopy(topk32_.data(), topk32_.size() * 4);
  else
    topk_d_ = DeviceCopy(topk64_.data(), topk64_.size() * 8);
  weights_d_ = DeviceCopy(weights_.data(), weights_.size() * 4);
}

void RankInputs::refresh(uint64_t seed, bool reroute) {
  generate(seed, /*values_only=*/!reroute);
  x_d_.write(x_.data(), x_.size());
  scales_d_.write(scales_.data(), scales_.size() * 4);
  weights_d_.write(weights_.data(), weights_.size() * 4);
  if (case_.int32_idx)
    topk_d_.write(topk32_.data(), topk32_.size() * 4);
  else
    topk_d_.write(topk64_.data(), topk64_.size() * 8);
}

TensorView RankInputs::view(bool on_gpu, const void* host, const DeviceCopy& device, DType dtype,
                            std::initializer_list<int64_t> shape) const {
  if (!on_gpu) return host_view(host, dtype, shape);
  int index = 0;
  cudaGetDevice(&index);
  return TensorView::contiguous(device.data(), dtype, shape, Device::cuda(index));
}

DispatchInputs RankInputs::dispatch_inputs(bool on_gpu) const {
  const int K = case_.num_topk, H = case_.hidden;
  DispatchInputs in;
  in.x = view(on_gpu, x_.data(), x_d_, case_.fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, {T_, H});
  if (case_.fp8) {
    TensorView scales = case_.scales_column_major
                            ? view(on_gpu, scales_.data(), scales_d_, DType::kFloat32, {S_, T_}).transposed(0, 1)
                            : view(on_gpu, scales_.data(), scales_d_, DType::kFloat32, {T_, S_});
    in.x_scales = scales;
  }
  in.topk_idx = case_.int32_idx ? view(on_gpu, topk32_.data(), topk_d_, DType::kInt32, {T_, K})
                                : view(on_gpu, topk64_.data(), topk_d_, DType::kInt64, {T_, K});
  if (case_.with_weights) in.topk_weights = view(on_gpu, weights_.data(), weights_d_, DType::kFloat32, {T_, K});
  in.num_experts = case_.experts_per_rank * num_ranks_;
  in.expert_alignment = case_.expert_alignment;
  in.num_worst_tokens = case_.num_worst_tokens;
  in.config = case_.config;
  return in;
}

BufferOptions cpu_options() {
  BufferOptions options;
  options.backend = BackendKind::kCpu;
  options.num_nvl_bytes = int64_t(32) << 20;
  return options;
}

BufferOptions gpu_options(int num_ranks, int64_t hidden_bytes, const std::vector<Config>& configs, int device) {
  BufferOptions options;
  options.backend = BackendKind::kCuda;
  options.device = device;
  for (const Config& c : configs)
    options.num_nvl_bytes = std::max(options.num_nvl_bytes, c.nvl_buffer_size_hint(hidden_bytes, num_ranks));
  return options;
}

namespace {

// A device copy of a host tensor's contents, and the view of it.
struct UploadedTensor {
  DeviceCopy memory;
  TensorView view;
};

UploadedTensor upload_like(const TensorView& host) {
  UploadedTensor out;
  const std::vector<uint8_t> bytes = contents(host);
  out.memory = DeviceCopy(bytes.data(), bytes.size());
  int index = 0;
  cudaGetDevice(&index);
  std::vector<int64_t> shape(host.shape.begin(), host.shape.begin() + host.ndim);
  out.view = TensorView::contiguous(out.memory.data(), host.dtype, shape, Device::cuda(index));
  return out;
}

void compare_layout(const LayoutResult& cpu, const LayoutResult& gpu) {
  expect_same_rows("layout num_tokens_per_rank", cpu.num_tokens_per_rank, gpu.num_tokens_per_rank);
  expect_same_rows("layout num_tokens_per_expert", cpu.num_tokens_per_expert, gpu.num_tokens_per_expert);
  expect_same_rows("layout is_token_in_rank", cpu.is_token_in_rank, gpu.is_token_in_rank);
  ASSERT_EQ(cpu.num_tokens_per_rdma_rank.has_value(), gpu.num_tokens_per_rdma_rank.has_value());
  if (cpu.num_tokens_per_rdma_rank)
    expect_same_rows("layout num_tokens_per_rdma_rank", *cpu.num_tokens_per_rdma_rank, *gpu.num_tokens_per_rdma_rank);
}

// Rows of recv_x that hold real tokens.
int64_t real_rows(const DispatchHandle& handle, int rank) {
  const std::vector<int32_t> prefix = values<int32_t>(handle.rank_prefix_matrix);
  return std::min<int64_t>(prefix[size_t(handle.num_ranks - 1) * handle.num_ranks + rank], handle.num_recv_tokens);
}

void compare_dispatch(const DispatchResult& cpu, const DispatchResult& gpu, int rank) {
  ASSERT_TRUE(cpu.handle && gpu.handle);
  const DispatchHandle& ch = *cpu.handle;
  const DispatchHandle& gh = *gpu.handle;
  ASSERT_EQ(ch.num_recv_tokens, gh.num_recv_tokens);
  EXPECT_EQ(ch.num_tokens, gh.num_tokens);
  EXPECT_EQ(ch.num_topk, gh.num_topk);
  expect_same_rows("handle rank_prefix_matrix", ch.rank_prefix_matrix, gh.rank_prefix_matrix);
  expect_same_rows("handle is_token_in_rank", ch.is_token_in_rank, gh.is_token_in_rank);
  expect_same_rows("handle send_row", ch.send_row, gh.send_row);
  const int64_t real = real_rows(ch, rank);
  expect_same_rows("handle recv_src_idx", ch.recv_src_idx, gh.recv_src_idx, real);
  expect_same_rows("recv_x", cpu.recv_x, gpu.recv_x, real);
  ASSERT_EQ(cpu.recv_x_scales.has_value(), gpu.recv_x_scales.has_value());
  if (cpu.recv_x_scales) {
    expect_same_rows("recv_x_scales", *cpu.recv_x_scales, *gpu.recv_x_scales, real);
    EXPECT_EQ(cpu.recv_x_scales->stride(1) == 1, gpu.recv_x_scales->stride(1) == 1) << "recv_x_scales majorness";
  }
  ASSERT_EQ(cpu.recv_topk_idx.has_value(), gpu.recv_topk_idx.has_value());
  if (cpu.recv_topk_idx) expect_same_rows("recv_topk_idx", *cpu.recv_topk_idx, *gpu.recv_topk_idx);
  ASSERT_EQ(cpu.recv_topk_weights.has_value(), gpu.recv_topk_weights.has_value());
  if (cpu.recv_topk_weights) expect_same_rows("recv_topk_weights", *cpu.recv_topk_weights, *gpu.recv_topk_weights);
  EXPECT_EQ(cpu.num_recv_tokens_per_expert, gpu.num_recv_tokens_per_expert);
}

}  // namespace

void run_case(const Case& c, Buffer& cpu, Buffer& gpu, int rank, int num_ranks) {
  SCOPED_TRACE(c.name + " (rank " + std::to_string(rank) + " of " + std::to_string(num_ranks) + ")");
  PoisonAllocator poison;
  const StreamOptions on_cpu{.allocator = &poison}, on_gpu{.allocator = &poison};
  RankInputs inputs(c, rank, num_ranks);
  DispatchInputs cpu_in = inputs.dispatch_inputs(false), gpu_in = inputs.dispatch_inputs(true);
  const int E = cpu_in.num_experts;

  const LayoutResult cpu_layout = cpu.get_dispatch_layout(*cpu_in.topk_idx, E, on_cpu);
  const LayoutResult gpu_layout = gpu.get_dispatch_layout(*gpu_in.topk_idx, E, on_gpu);
  compare_layout(cpu_layout, gpu_layout);
  if (c.pass_layout || c.routing_by_flags) {
    for (auto [in, layout] : {std::pair{&cpu_in, &cpu_layout}, std::pair{&gpu_in, &gpu_layout}}) {
      in->is_token_in_rank = layout->is_token_in_rank;
      if (c.pass_layout) {
        in->num_tokens_per_rank = layout->num_tokens_per_rank;
        in->num_tokens_per_expert = layout->num_tokens_per_expert;
      }
    }
  }

  const DispatchResult cpu_out = cpu.dispatch(cpu_in, on_cpu);
  const DispatchResult gpu_out = gpu.dispatch(gpu_in, on_gpu);
  compare_dispatch(cpu_out, gpu_out, rank);
  if (::testing::Test::HasFatalFailure()) return;

  // Combine: new random expert outputs, the received weights back, optional bias.
  const DispatchHandle& ch = *cpu_out.handle;
  const std::vector<uint16_t> expert_out = random_bf16(size_t(ch.num_recv_tokens) * c.hidden, c.seed * 31 + rank);
  CombineInputs cpu_combine, gpu_combine;
  cpu_combine.x = host_view(expert_out.data(), DType::kBFloat16, {ch.num_recv_tokens, c.hidden});
  UploadedTensor x_d = upload_like(cpu_combine.x);
  gpu_combine.x = x_d.view;
  cpu_combine.handle = cpu_out.handle.get();
  gpu_combine.handle = gpu_out.handle.get();
  UploadedTensor weights_d;
  if (cpu_out.recv_topk_weights) {
    cpu_combine.topk_weights = *cpu_out.recv_topk_weights;
    weights_d = upload_like(*cpu_out.recv_topk_weights);
    gpu_combine.topk_weights = weights_d.view;
  }
  const int T = inputs.num_tokens();
  const std::vector<uint16_t> bias0 = random_bf16(size_t(T) * c.hidden, c.seed * 37 + rank);
  const std::vector<uint16_t> bias1 = random_bf16(size_t(T) * c.hidden, c.seed * 41 + rank);
  UploadedTensor bias0_d, bias1_d;
  if (c.num_bias >= 1) {
    cpu_combine.bias_0 = host_view(bias0.data(), DType::kBFloat16, {T, c.hidden});
    bias0_d = upload_like(*cpu_combine.bias_0);
    gpu_combine.bias_0 = bias0_d.view;
  }
  if (c.num_bias >= 2) {
    cpu_combine.bias_1 = host_view(bias1.data(), DType::kBFloat16, {T, c.hidden});
    bias1_d = upload_like(*cpu_combine.bias_1);
    gpu_combine.bias_1 = bias1_d.view;
  }
  cpu_combine.config = gpu_combine.config = c.config;
  const CombineResult cpu_combined = cpu.combine(cpu_combine, on_cpu);
  const CombineResult gpu_combined = gpu.combine(gpu_combine, on_gpu);
  expect_same_rows("combined_x", cpu_combined.combined_x, gpu_combined.combined_x);
  ASSERT_EQ(cpu_combined.combined_topk_weights.has_value(), gpu_combined.combined_topk_weights.has_value());
  if (cpu_combined.combined_topk_weights)
    expect_same_rows("combined_topk_weights", *cpu_combined.combined_topk_weights, *gpu_combined.combined_topk_weights);

  // Cached dispatch with the handles: the same rows as the fresh dispatch.
  DispatchInputs cpu_cached, gpu_cached;
  cpu_cached.x = cpu_in.x;
  cpu_cached.x_scales = cpu_in.x_scales;
  cpu_cached.handle = cpu_out.handle.get();
  gpu_cached.x = gpu_in.x;
  gpu_cached.x_scales = gpu_in.x_scales;
  gpu_cached.handle = gpu_out.handle.get();
  cpu_cached.config = gpu_cached.config = c.config;
  const DispatchResult cpu_again = cpu.dispatch(cpu_cached, on_cpu);
  const DispatchResult gpu_again = gpu.dispatch(gpu_cached, on_gpu);
  const int64_t real = real_rows(ch, rank);
  expect_same_rows("cached recv_x", cpu_again.recv_x, gpu_again.recv_x, real);
  expect_same_rows("cached recv_x vs fresh", gpu_out.recv_x, gpu_again.recv_x, real);
  if (cpu_again.recv_x_scales)
    expect_same_rows("cached recv_x_scales", *cpu_again.recv_x_scales, *gpu_again.recv_x_scales, real);
  EXPECT_FALSE(gpu_again.handle) << "a cached dispatch returns no handle";

  EXPECT_NO_THROW(gpu.check_errors());
}

}  // namespace epcomm::testing::normal
