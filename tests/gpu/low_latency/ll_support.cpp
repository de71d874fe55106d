#include "ll_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>

#include "core/numerics.hpp"
#include "support/gpu.hpp"

namespace epcomm::testing::ll {
namespace {

constexpr uint8_t kPoison = 0xA5;

int local_experts(const Case& c, int num_ranks) { return c.experts / num_ranks; }
int64_t rows_per_expert(const Case& c, int num_ranks) { return int64_t(num_ranks) * c.max_tokens; }
bool is_fp8(const Case& c) { return c.format != Format::kBf16; }

// 64-bit mix of a few integers (splitmix64 steps): the same value on every run and machine.
uint64_t mix(uint64_t a, uint64_t b, uint64_t c = 0, uint64_t d = 0) {
  uint64_t h = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull);
  for (uint64_t v : {c, d}) {
    h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    h ^= h >> 30;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 27;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 31;
  }
  return h;
}

// A bf16 value in about [-4, 4], never exactly zero.
uint16_t random_bf16(uint64_t bits) {
  const float unit = float(bits >> 40) / float(1ull << 24);  // [0, 1)
  float value = (unit - 0.5f) * 8.0f;
  if (value == 0.0f) value = 0.015625f;
  return numerics::float_to_bf16(value);
}

void copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync H2D");
}

// Every element a strided tensor can reach, copied to the host.
std::vector<uint8_t> read_span(const TensorView& t, int64_t* elements) {
  int64_t extent = 1;
  for (int d = 0; d < t.ndim; ++d) extent += (t.shape[d] - 1) * t.strides[d];
  if (t.numel() == 0) extent = 0;
  *elements = extent;
  std::vector<uint8_t> bytes(size_t(extent) * dtype_size(t.dtype));
  if (bytes.empty()) return bytes;
  if (t.device.is_cuda()) {
    cuda_check(cudaMemcpy(bytes.data(), t.data, bytes.size(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  } else {
    std::memcpy(bytes.data(), t.data, bytes.size());
  }
  return bytes;
}

template <class T>
std::vector<T> read_all(const TensorView& t) {
  int64_t elements = 0;
  const std::vector<uint8_t> bytes = read_span(t, &elements);
  std::vector<T> out(static_cast<size_t>(elements));
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

std::vector<int64_t> make_routing(const Case& c, int rank, uint64_t seed) {
  std::mt19937_64 rng(mix(seed, 0x70b1c, rank));
  const int T = c.tokens_of(rank), K = c.topk, E = c.experts;
  std::uniform_int_distribution<int> any_expert(0, E - 1);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  const int64_t one_expert = int64_t(mix(seed, 0xe) % uint64_t(E));
  std::vector<int64_t> topk(size_t(T) * K, -1);
  for (int t = 0; t < T; ++t) {
    int64_t* row = topk.data() + size_t(t) * K;
    for (int k = 0; k < K; ++k) {
      int64_t e = any_expert(rng);
      if (c.routing == Routing::kOneExpert && k == 0) {
        e = one_expert;
      } else if (c.routing == Routing::kGapsAndRepeats) {
        const double r = u01(rng);
        if (r < 0.2) {
          e = -1;
        } else if (r < 0.35 && k > 0) {
          e = row[std::uniform_int_distribution<int>(0, k - 1)(rng)];
        }
      } else if (K <= E) {  // distinct experts
        while (std::find(row, row + k, e) != row + k) e = any_expert(rng);
      }
      row[k] = e;
    }
  }
  return topk;
}

}  // namespace

std::string Case::name() const {
  static const char* formats[] = {"bf16", "fp8", "fp8-round", "fp8-ue8m0"};
  static const char* routings[] = {"random", "gaps+repeats", "one-expert"};
  std::ostringstream s;
  s << "T_max=" << max_tokens << " T=" << tokens << " hidden=" << hidden << " K=" << topk << " E=" << experts << " "
    << formats[int(format)] << " " << routings[int(routing)] << (hook ? " hook" : "") << (zero_copy ? " zero-copy" : "")
    << (out ? " out=" : "") << (stats ? " stats" : "") << (int32_index ? " int32-idx" : "")
    << (ragged ? " ragged" : "");
  return s.str();
}

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
}

DeviceMemory DeviceMemory::allocate(size_t bytes) {
  void* pointer = nullptr;
  cuda_check(cudaMalloc(&pointer, std::max<size_t>(bytes, 16)), "cudaMalloc");
  return DeviceMemory{std::shared_ptr<void>(pointer, [](void* p) { cudaFree(p); })};
}

Tensor PoisonAllocator::allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) {
  const TensorView probe = TensorView::contiguous(nullptr, dtype, shape, device);
  DeviceMemory memory = DeviceMemory::allocate(probe.nbytes());
  cuda_check(cudaMemsetAsync(memory.get(), kPoison, std::max<size_t>(probe.nbytes(), 16), stream), "cudaMemsetAsync");
  return Tensor(TensorView::contiguous(memory.get(), dtype, shape, device), memory.memory);
}

ArenaAllocator::ArenaAllocator(size_t bytes) : arena_(DeviceMemory::allocate(bytes)), bytes_(bytes) {
  cuda_check(cudaMemset(arena_.get(), kPoison, bytes), "cudaMemset");
}

Tensor ArenaAllocator::allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle) {
  const TensorView probe = TensorView::contiguous(nullptr, dtype, shape, device);
  const size_t bytes = (probe.nbytes() + 255) / 256 * 256;
  if (used_ + bytes > bytes_) throw std::runtime_error("ArenaAllocator: arena too small");
  void* pointer = static_cast<uint8_t*>(arena_.get()) + used_;
  used_ += bytes;
  return Tensor(TensorView::contiguous(pointer, dtype, shape, device), arena_.memory);
}

Inputs make_inputs(const Case& c, int rank, int /*num_ranks*/, uint64_t seed) {
  Inputs in;
  in.tokens = c.tokens_of(rank);
  const int T = in.tokens, H = c.hidden, K = c.topk;
  in.x.resize(size_t(T) * H);
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < H; ++h) {
      // Magnitudes differ per 128-channel block so that FP8 scales differ too.
      const uint64_t bits = mix(seed, rank, t, h);
      const int block_shift = int(mix(seed, rank, t, 1000000 + h / 128) % 9) - 4;
      float value = numerics::bf16_to_float(random_bf16(bits)) * std::ldexp(1.0f, block_shift);
      if (h == 0) value = float(rank + 1);  // a misrouted row says where it came from
      if (h == 1) value = float(t % 256 + 1);
      in.x[size_t(t) * H + h] = numerics::float_to_bf16(value);
    }
  }
  in.topk = make_routing(c, rank, seed);
  in.topk32.assign(in.topk.begin(), in.topk.end());
  in.weights.resize(size_t(T) * K);
  for (size_t i = 0; i < in.weights.size(); ++i) {
    const float unit = float(mix(seed, rank, 0x3e, i) >> 40) / float(1ull << 24);
    in.weights[i] = unit * 2.0f - 0.75f;
  }
  return in;
}

Views host_views(Inputs& in, const Case& c) {
  Views v;
  const int64_t T = in.tokens;
  v.tokens = in.tokens;
  const Device cpu = Device::cpu();
  v.x = TensorView::contiguous(in.x.data(), DType::kBFloat16, {T, c.hidden}, cpu);
  v.topk = c.int32_index ? TensorView::contiguous(in.topk32.data(), DType::kInt32, {T, c.topk}, cpu)
                         : TensorView::contiguous(in.topk.data(), DType::kInt64, {T, c.topk}, cpu);
  v.weights = TensorView::contiguous(in.weights.data(), DType::kFloat32, {T, c.topk}, cpu);
  return v;
}

Views device_views(const Inputs& in, const Case& c, cudaStream_t stream) {
  Views v;
  const int64_t T = in.tokens;
  v.tokens = in.tokens;
  int device = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  const Device gpu = Device::cuda(device);
  auto upload = [&](const void* data, size_t bytes) {
    DeviceMemory m = DeviceMemory::allocate(bytes);
    if (bytes > 0) copy_to_device(m.get(), data, bytes, stream);
    v.keep.push_back(m);
    return m.get();
  };
  v.x = TensorView::contiguous(upload(in.x.data(), in.x.size() * 2), DType::kBFloat16, {T, c.hidden}, gpu);
  v.topk = c.int32_index
               ? TensorView::contiguous(upload(in.topk32.data(), in.topk32.size() * 4), DType::kInt32, {T, c.topk}, gpu)
               : TensorView::contiguous(upload(in.topk.data(), in.topk.size() * 8), DType::kInt64, {T, c.topk}, gpu);
  v.weights =
      TensorView::contiguous(upload(in.weights.data(), in.weights.size() * 4), DType::kFloat32, {T, c.topk}, gpu);
  cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return v;
}

TensorView ExpertOutputs::host_view() const {
  const int64_t L = int64_t(counts.size());
  return TensorView::contiguous(data.get(), DType::kBFloat16, {L, rows_per_expert, int64_t(hidden)}, Device::cpu());
}

void ExpertOutputs::copy_to_device(void* device, cudaStream_t stream) const {
  const size_t row_bytes = size_t(hidden) * 2;
  for (size_t l = 0; l < counts.size(); ++l) {
    const size_t offset = l * size_t(rows_per_expert) * row_bytes;
    if (counts[l] > 0)
      cuda_check(
          cudaMemcpyAsync(static_cast<uint8_t*>(device) + offset, reinterpret_cast<uint8_t*>(data.get()) + offset,
                          size_t(counts[l]) * row_bytes, cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync experts");
  }
  cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

ExpertOutputs make_expert_outputs(const Case& c, int num_ranks, const std::vector<int32_t>& counts, int rank,
                                  uint64_t seed) {
  ExpertOutputs e;
  e.counts = counts;
  e.rows_per_expert = rows_per_expert(c, num_ranks);
  e.hidden = c.hidden;
  const size_t elements = counts.size() * size_t(e.rows_per_expert) * c.hidden;
  // malloc, not a vector: pages of rows nobody writes are never touched.
  e.data =
      std::shared_ptr<uint16_t>(static_cast<uint16_t*>(std::malloc(std::max<size_t>(elements * 2, 16))), std::free);
  for (size_t l = 0; l < counts.size(); ++l)
    for (int64_t row = 0; row < counts[l]; ++row) {
      uint16_t* out = e.data.get() + (l * e.rows_per_expert + row) * c.hidden;
      for (int h = 0; h < c.hidden; ++h) out[h] = random_bf16(mix(seed ^ 0xe4, rank, l * 1000003 + row, h));
    }
  return e;
}

ExpertOutputs fake_expert_outputs(const DispatchOut& dispatched, const Case& c, int num_ranks) {
  ExpertOutputs e;
  e.counts = dispatched.recv_count;
  e.rows_per_expert = rows_per_expert(c, num_ranks);
  e.hidden = c.hidden;
  const size_t elements = e.counts.size() * size_t(e.rows_per_expert) * c.hidden;
  e.data =
      std::shared_ptr<uint16_t>(static_cast<uint16_t*>(std::malloc(std::max<size_t>(elements * 2, 16))), std::free);
  for (size_t l = 0; l < e.counts.size(); ++l) {
    const uint16_t* in = reinterpret_cast<const uint16_t*>(dispatched.rows[l].data());
    uint16_t* out = e.data.get() + l * e.rows_per_expert * c.hidden;
    for (size_t i = 0; i < size_t(e.counts[l]) * c.hidden; ++i) out[i] = fake_expert_value(in[i], int(l));
  }
  return e;
}

DispatchOut read_dispatch(const LowLatencyDispatchResult& r, const Case& c, int num_ranks) {
  const int L = local_experts(c, num_ranks);
  const int64_t N = rows_per_expert(c, num_ranks);
  DispatchOut out;
  out.recv_count = read_all<int32_t>(r.recv_count);
  out.layout_range = read_all<int64_t>(r.handle.layout_range);
  const std::vector<int32_t> src_info = read_all<int32_t>(r.handle.src_info);
  const int64_t row_bytes = int64_t(c.hidden) * (is_fp8(c) ? 1 : 2);
  out.rows.resize(L);
  out.scales.resize(L);
  out.src_info.resize(L);
  std::vector<uint32_t> scales;
  if (r.recv_x_scales) scales = read_all<uint32_t>(*r.recv_x_scales);
  for (int l = 0; l < L; ++l) {
    const int count = std::clamp<int>(out.recv_count[l], 0, int(N));
    out.rows[l].resize(size_t(count) * row_bytes);
    const uint8_t* base = static_cast<const uint8_t*>(r.recv_x.data) + l * N * row_bytes;
    if (count > 0) {
      if (r.recv_x.device.is_cuda()) {
        cuda_check(cudaMemcpy(out.rows[l].data(), base, out.rows[l].size(), cudaMemcpyDeviceToHost), "cudaMemcpy rows");
      } else {
        std::memcpy(out.rows[l].data(), base, out.rows[l].size());
      }
    }
    out.src_info[l].assign(src_info.begin() + l * N, src_info.begin() + l * N + count);
    if (r.recv_x_scales) {
      const TensorView& s = *r.recv_x_scales;
      for (int row = 0; row < count; ++row)
        for (int64_t col = 0; col < s.shape[2]; ++col)
          out.scales[l].push_back(scales[size_t(l * s.strides[0] + row * s.strides[1] + col * s.strides[2])]);
    }
  }
  return out;
}

std::vector<uint16_t> read_bf16(const TensorView& t) { return read_all<uint16_t>(t); }

bool expect_same_dispatch(const DispatchOut& e, const DispatchOut& a, const std::string& what) {
  if (e.recv_count != a.recv_count) {
    std::ostringstream s;
    for (size_t l = 0; l < e.recv_count.size(); ++l)
      if (e.recv_count[l] != a.recv_count[l])
        s << " expert " << l << ": expected " << e.recv_count[l] << " got " << a.recv_count[l] << ";";
    ADD_FAILURE() << what << ": recv_count differs:" << s.str();
    return false;
  }
  for (size_t i = 0; i < e.layout_range.size(); ++i)
    if (e.layout_range[i] != a.layout_range[i]) {
      ADD_FAILURE() << what << ": layout_range[" << i << "] expected (begin " << (e.layout_range[i] >> 32) << ", count "
                    << (e.layout_range[i] & 0xFFFFFFFF) << ") got (begin " << (a.layout_range[i] >> 32) << ", count "
                    << (a.layout_range[i] & 0xFFFFFFFF) << ")";
      return false;
    }
  for (size_t l = 0; l < e.rows.size(); ++l) {
    for (size_t row = 0; row < e.src_info[l].size(); ++row)
      if (e.src_info[l][row] != a.src_info[l][row]) {
        ADD_FAILURE() << what << ": src_info[" << l << "][" << row << "] expected " << e.src_info[l][row] << " got "
                      << a.src_info[l][row];
        return false;
      }
    if (e.rows[l] != a.rows[l]) {
      const size_t row_bytes = e.src_info[l].empty() ? 1 : e.rows[l].size() / e.src_info[l].size();
      size_t i = 0;
      while (e.rows[l][i] == a.rows[l][i]) ++i;
      ADD_FAILURE() << what << ": recv_x expert " << l << " row " << i / row_bytes << " (token "
                    << e.src_info[l][i / row_bytes] << ") byte " << i % row_bytes << ": expected " << int(e.rows[l][i])
                    << " got " << int(a.rows[l][i]) << (a.rows[l][i] == kPoison ? " (poison)" : "");
      return false;
    }
    if (e.scales[l] != a.scales[l]) {
      size_t i = 0;
      while (e.scales[l][i] == a.scales[l][i]) ++i;
      const size_t per_row = e.src_info[l].empty() ? 1 : e.scales[l].size() / e.src_info[l].size();
      ADD_FAILURE() << what << ": scales expert " << l << " row " << i / per_row << " column " << i % per_row
                    << ": expected 0x" << std::hex << e.scales[l][i] << " got 0x" << a.scales[l][i];
      return false;
    }
  }
  return true;
}

bool expect_same_bf16(const std::vector<uint16_t>& e, const std::vector<uint16_t>& a, int hidden,
                      const std::string& what) {
  if (e.size() != a.size()) {
    ADD_FAILURE() << what << ": " << e.size() << " elements expected, got " << a.size();
    return false;
  }
  for (size_t i = 0; i < e.size(); ++i)
    if (e[i] != a[i]) {
      ADD_FAILURE() << what << ": token " << i / hidden << " channel " << i % hidden << ": expected 0x" << std::hex
                    << e[i] << " (" << numerics::bf16_to_float(e[i]) << ") got 0x" << a[i] << " ("
                    << numerics::bf16_to_float(a[i]) << ")";
      return false;
    }
  return true;
}

LowLatencyDispatchResult dispatch(const Side& side, const Views& v, const Case& c, const StatsViews& stats) {
  LowLatencyDispatchInputs in;
  in.x = v.x;
  in.topk_idx = v.topk;
  in.num_max_dispatch_tokens_per_rank = c.max_tokens;
  in.num_experts = c.experts;
  in.cumulative_local_expert_recv_stats = stats.recv;
  in.dispatch_wait_recv_cost_stats = stats.wait;
  in.use_fp8 = is_fp8(c);
  in.round_scale = c.format == Format::kFp8RoundScale || c.format == Format::kFp8Ue8m0;
  in.use_ue8m0 = c.format == Format::kFp8Ue8m0;
  LowLatencyOptions options;
  options.stream = side.stream;
  options.return_recv_hook = c.hook;
  options.allocator = side.allocator;
  return side.buffer->low_latency_dispatch(in, options);
}

LowLatencyCombineResult combine(const Side& side, const Views& v, const Case& c, const LowLatencyHandle& handle,
                                const ExpertOutputs& experts, std::vector<DeviceMemory>& keep,
                                const std::optional<TensorView>& wait_stats) {
  LowLatencyCombineInputs in;
  in.topk_idx = v.topk;
  in.topk_weights = v.weights;
  in.handle = &handle;
  in.combine_wait_recv_cost_stats = wait_stats;
  const int64_t L = int64_t(experts.counts.size());
  if (!side.cuda) {
    in.x = experts.host_view();
    if (c.out) {
      auto host = std::shared_ptr<void>(std::malloc(size_t(v.tokens) * c.hidden * 2 + 16), std::free);
      keep.push_back(DeviceMemory{host});
      in.out = TensorView::contiguous(host.get(), DType::kBFloat16, {v.tokens, c.hidden}, Device::cpu());
    }
  } else {
    int device = 0;
    cuda_check(cudaGetDevice(&device), "cudaGetDevice");
    const Device gpu = Device::cuda(device);
    if (c.zero_copy) {
      in.x = side.buffer->next_low_latency_combine_buffer(handle);
      in.zero_copy = true;
    } else {
      DeviceMemory x = DeviceMemory::allocate(size_t(L) * experts.rows_per_expert * c.hidden * 2);
      cuda_check(cudaMemset(x.get(), kPoison, size_t(L) * experts.rows_per_expert * c.hidden * 2), "cudaMemset");
      keep.push_back(x);
      in.x = TensorView::contiguous(x.get(), DType::kBFloat16, {L, experts.rows_per_expert, int64_t(c.hidden)}, gpu);
    }
    experts.copy_to_device(in.x.data, side.stream);
    if (c.out) {
      DeviceMemory out = DeviceMemory::allocate(size_t(v.tokens) * c.hidden * 2);
      cuda_check(cudaMemset(out.get(), kPoison, size_t(v.tokens) * c.hidden * 2), "cudaMemset");
      keep.push_back(out);
      in.out = TensorView::contiguous(out.get(), DType::kBFloat16, {v.tokens, c.hidden}, gpu);
    }
  }
  LowLatencyOptions options;
  options.stream = side.stream;
  options.return_recv_hook = c.hook;
  options.allocator = side.allocator;
  return side.buffer->low_latency_combine(in, options);
}

void finish(const Side& side, RecvHook& hook) {
  if (hook) hook(side.stream);
  if (side.cuda) cuda_check(cudaStreamSynchronize(side.stream), "cudaStreamSynchronize");
}

int visible_gpus() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

bool rank_count_runs_here(int num_ranks) {
  int max_ranks = 8;
  if (const char* env = std::getenv("EPCOMM_TEST_MAX_RANKS")) max_ranks = std::atoi(env);
  const bool share = std::getenv("EPCOMM_TEST_SHARE_GPUS") != nullptr;
  // Asked of a child process: the parent of the ranks must not create a CUDA context.
  return num_ranks <= max_ranks && (share || num_ranks <= visible_gpu_count());
}

std::vector<int> rank_counts() {
  std::vector<int> out;
  for (int r : {2, 3, 4, 8})
    if (rank_count_runs_here(r)) out.push_back(r);
  return out;
}

Buffers make_buffers(Bootstrap& group, const std::vector<Case>& cases, bool enable_shrink,
                     std::chrono::milliseconds timeout, const std::function<void(BufferOptions&)>& edit) {
  Buffers b;
  const int gpus = visible_gpus();
  if (gpus == 0) throw std::runtime_error("no CUDA device");
  b.device = group.rank() % gpus;
  cuda_check(cudaSetDevice(b.device), "cudaSetDevice");
  int64_t bytes = 0;
  for (const Case& c : cases)
    bytes = std::max(bytes, low_latency_buffer_size_hint(c.max_tokens, c.hidden, group.size(), c.experts));
  BufferOptions options;
  options.backend = BackendKind::kCpu;
  options.num_rdma_bytes = bytes;
  options.low_latency_mode = true;
  options.timeout = timeout;
  options.enable_shrink = enable_shrink;
  if (edit) edit(options);
  b.cpu = std::make_unique<Buffer>(group, options);
  options.backend = BackendKind::kCuda;
  options.device = b.device;
  b.gpu = std::make_unique<Buffer>(group, options);
  cuda_check(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  return b;
}

void Buffers::destroy() {
  if (gpu) gpu->destroy();
  if (cpu) cpu->destroy();
  if (stream) cudaStreamDestroy(stream);
  stream = nullptr;
}

Side cpu_side(Buffers& b) { return Side{b.cpu.get(), false, nullptr, nullptr}; }
Side gpu_side(Buffers& b) { return Side{b.gpu.get(), true, b.stream, &b.poison}; }

bool check_case(Buffers& b, const Case& c, int rank, int num_ranks, uint64_t seed) {
  const std::string what = "rank " + std::to_string(rank) + " [" + c.name() + "]";
  const int L = local_experts(c, num_ranks);
  Inputs in = make_inputs(c, rank, num_ranks, seed);
  Views hv = host_views(in, c);
  Views dv = device_views(in, c, b.stream);
  const Side cpu = cpu_side(b), gpu = gpu_side(b);

  // Stats: the same starting values on both sides.
  std::vector<int32_t> cpu_recv_stats(L), gpu_recv_stats_init(L);
  for (int l = 0; l < L; ++l) cpu_recv_stats[l] = gpu_recv_stats_init[l] = int32_t(mix(seed, rank, l) % 1000);
  std::vector<int64_t> cpu_wait(num_ranks, 0), cpu_combine_wait(num_ranks, 0);
  DeviceMemory gpu_recv_stats = DeviceMemory::allocate(L * 4), gpu_wait = DeviceMemory::allocate(num_ranks * 8),
               gpu_combine_wait = DeviceMemory::allocate(num_ranks * 8);
  cuda_check(cudaMemcpy(gpu_recv_stats.get(), gpu_recv_stats_init.data(), L * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  cuda_check(cudaMemset(gpu_wait.get(), 0, num_ranks * 8), "cudaMemset");
  cuda_check(cudaMemset(gpu_combine_wait.get(), 0, num_ranks * 8), "cudaMemset");
  StatsViews cpu_stats, gpu_stats;
  if (c.stats) {
    cpu_stats.recv = TensorView::contiguous(cpu_recv_stats.data(), DType::kInt32, {L}, Device::cpu());
    cpu_stats.wait = TensorView::contiguous(cpu_wait.data(), DType::kInt64, {num_ranks}, Device::cpu());
    gpu_stats.recv = TensorView::contiguous(gpu_recv_stats.get(), DType::kInt32, {L}, Device::cuda(b.device));
    gpu_stats.wait = TensorView::contiguous(gpu_wait.get(), DType::kInt64, {num_ranks}, Device::cuda(b.device));
  }

  // Every rank makes the same calls whatever it finds: a rank that stopped early would hang the others.
  LowLatencyDispatchResult expected = dispatch(cpu, hv, c, cpu_stats);
  finish(cpu, expected.hook);
  LowLatencyDispatchResult actual = dispatch(gpu, dv, c, gpu_stats);
  finish(gpu, actual.hook);
  const DispatchOut expected_out = read_dispatch(expected, c, num_ranks);
  bool same = expect_same_dispatch(expected_out, read_dispatch(actual, c, num_ranks), what + " dispatch");
  if (c.stats) {
    std::vector<int32_t> got(L);
    cuda_check(cudaMemcpy(got.data(), gpu_recv_stats.get(), L * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
    EXPECT_EQ(cpu_recv_stats, got) << what << ": cumulative_local_expert_recv_stats";
    std::vector<int64_t> waited(num_ranks);
    cuda_check(cudaMemcpy(waited.data(), gpu_wait.get(), num_ranks * 8, cudaMemcpyDeviceToHost), "cudaMemcpy");
    for (int r = 0; r < num_ranks; ++r)
      EXPECT_GE(waited[r], 0) << what << ": dispatch_wait_recv_cost_stats[" << r << "] (nanoseconds)";
  }

  const ExpertOutputs experts = make_expert_outputs(c, num_ranks, expected_out.recv_count, rank, seed);
  std::vector<DeviceMemory> keep;
  std::optional<TensorView> cpu_cwait, gpu_cwait;
  if (c.stats) {
    cpu_cwait = TensorView::contiguous(cpu_combine_wait.data(), DType::kInt64, {num_ranks}, Device::cpu());
    gpu_cwait = TensorView::contiguous(gpu_combine_wait.get(), DType::kInt64, {num_ranks}, Device::cuda(b.device));
  }
  Case reference = c;
  reference.zero_copy = false;
  LowLatencyCombineResult expected_c = combine(cpu, hv, reference, expected.handle, experts, keep, cpu_cwait);
  finish(cpu, expected_c.hook);
  LowLatencyCombineResult actual_c = combine(gpu, dv, c, actual.handle, experts, keep, gpu_cwait);
  finish(gpu, actual_c.hook);
  same &=
      expect_same_bf16(read_bf16(expected_c.combined_x), read_bf16(actual_c.combined_x), c.hidden, what + " combine");
  return same;
}

}  // namespace epcomm::testing::ll
