// The core's pure pieces: configs and size hints, the buffer layouts, tensor views, timeouts, and the
// bf16 rounding every backend shares.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <set>
#include <sstream>

#include "core/backend.hpp"
#include "core/environment.hpp"
#include "core/layouts.hpp"
#include "core/numerics.hpp"
#include "core/timeout.hpp"
#include "epcomm/epcomm.hpp"

namespace epcomm {
namespace {

template <class Fn>
std::string error_message(Fn&& fn, ErrorCode expected_code) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), expected_code) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no epcomm::Error thrown";
  return {};
}

TEST(Config, RejectsOddSmCountNamingIt) {
  Config config;
  config.num_sms = 7;
  const std::string message = error_message([&] { config.validate(); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("num_sms"), std::string::npos) << message;
  EXPECT_NE(message.find("7"), std::string::npos) << message;
}

TEST(Config, RejectsRecvChunkSmallerThanSendChunk) {
  Config config;
  config.num_max_nvl_chunked_send_tokens = 16;
  config.num_max_nvl_chunked_recv_tokens = 8;
  const std::string message = error_message([&] { config.validate(); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("num_max_nvl_chunked_recv_tokens"), std::string::npos) << message;
}

TEST(Config, NvlHintCoversEveryQueueAndGrowsWithSmsRanksAndHidden) {
  Config config;
  const int64_t base = config.nvl_buffer_size_hint(7168 * 2, 8);
  EXPECT_GE(base, kNormalControlBytes +
                      int64_t(8) * (config.num_sms / 2) * config.num_max_nvl_chunked_recv_tokens * 7168 * 2);
  Config more_sms = config;
  more_sms.num_sms = 24;
  EXPECT_GT(more_sms.nvl_buffer_size_hint(7168 * 2, 8), base);
  EXPECT_GT(config.nvl_buffer_size_hint(7168 * 2, 9), base);
  EXPECT_GT(config.nvl_buffer_size_hint(8192 * 2, 8), base);
}

TEST(Config, RdmaHintIsZeroOnOneNode) {
  Config config;
  EXPECT_EQ(config.rdma_buffer_size_hint(7168 * 2, 8, 8), 0);
  EXPECT_GT(config.rdma_buffer_size_hint(7168 * 2, 16, 8), 0);
}

TEST(Config, DefaultSmCountIsSettableAndChecked) {
  const int before = default_num_sms();
  set_default_num_sms(24);
  EXPECT_EQ(default_dispatch_config(8).num_sms, 24);
  EXPECT_EQ(default_combine_config(8).num_sms, 24);
  error_message([] { set_default_num_sms(3); }, ErrorCode::kInvalidArgument);
  set_default_num_sms(before);
}

TEST(LowLatencyLayout, RegionsAreDisjointAlignedAndWithinTheHint) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int R = 1 + rng() % 16;
    const int E = R * (1 + rng() % 16);
    const int T_max = 1 + rng() % 300;
    const int hidden = 128 * (1 + rng() % 64);
    const LowLatencyLayout layout{T_max, hidden, R, E};
    for (int parity = 0; parity < 2; ++parity) {
      EXPECT_EQ(layout.dispatch_recv_offset(parity) % 16, 0);
      EXPECT_EQ(layout.dispatch_meta_offset(parity) % 16, 0);
      EXPECT_EQ(layout.combine_recv_offset(parity) % 16, 0);
      EXPECT_EQ(layout.dispatch_messages_offset(parity) % 16, 0);
      EXPECT_EQ(layout.staging_offset(parity) % 16, 0);
      EXPECT_LE(layout.staging_offset(parity) + layout.staging_bytes(),
                layout.parity_offset(parity) + layout.parity_bytes());
    }
    EXPECT_LE(layout.parity_offset(0) + layout.parity_bytes(), layout.parity_offset(1));
    EXPECT_EQ(layout.parity_offset(1) + layout.parity_bytes(), layout.total_bytes());
    // In a larger buffer the second parity block sits at the end (calls of different shapes never overlap).
    LowLatencyLayout larger = layout;
    larger.buffer_bytes = layout.total_bytes() + 12345;
    EXPECT_EQ(larger.parity_offset(0), layout.parity_offset(0));
    EXPECT_LE(larger.parity_offset(1) + larger.parity_bytes(), larger.buffer_bytes);
    EXPECT_EQ(larger.parity_offset(1) % 4096, 0);
    EXPECT_EQ(layout.total_bytes(), low_latency_buffer_size_hint(T_max, hidden, R, E));
  }
}

TEST(LowLatencyLayout, BenchmarkShapeNeedsFarLessThanDeepEP) {
  // T_max = 128, hidden = 7168, 8 ranks, 256 experts: DeepEP V1 needs 1.9 GB.
  const int64_t bytes = low_latency_buffer_size_hint(128, 7168, 8, 256);
  EXPECT_LE(bytes, int64_t(500'000'000)) << bytes;  // goal: 0.5 GB
}

TEST(LowLatencyHint, NamesTheBadArgument) {
  std::string message =
      error_message([] { low_latency_buffer_size_hint(128, 7000, 8, 256); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("hidden"), std::string::npos) << message;
  message = error_message([] { low_latency_buffer_size_hint(128, 7168, 8, 250); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("num_experts"), std::string::npos) << message;
}

TEST(TensorView, ContiguousTransposedAndStrings) {
  int64_t storage[24];
  const TensorView view = TensorView::contiguous(storage, DType::kInt64, {2, 3, 4}, Device::cpu());
  EXPECT_EQ(view.numel(), 24);
  EXPECT_EQ(view.nbytes(), 24u * 8u);
  EXPECT_TRUE(view.is_contiguous());
  EXPECT_EQ(view.stride(0), 12);
  EXPECT_EQ(view.shape_string(), "[2, 3, 4]");
  const TensorView t = view.transposed(1, 2);
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_EQ(t.size(1), 4);
  EXPECT_EQ(t.stride(1), 1);
  EXPECT_EQ(t.stride(2), 4);
}

TEST(DefaultAllocator, AllocatesWritableHostMemory) {
  const int64_t shape[] = {3, 5};
  Tensor t = default_allocator().allocate(DType::kFloat32, shape, Device::cpu(), nullptr);
  ASSERT_NE(t.data, nullptr);
  EXPECT_TRUE(t.is_contiguous());
  for (int i = 0; i < 15; ++i) t.data_as<float>()[i] = float(i);
  Tensor copy = t;  // shares the storage
  EXPECT_EQ(copy.data_as<float>()[14], 14.0f);
}

TEST(Timeout, EnvironmentVariableIsParsedAndChecked) {
  setenv("EPCOMM_TIMEOUT_S", "1.5", 1);
  EXPECT_EQ(resolve_timeout(std::chrono::milliseconds(0)).count(), 1500);
  EXPECT_EQ(resolve_timeout(std::chrono::milliseconds(20)).count(), 20);
  setenv("EPCOMM_TIMEOUT_S", "soon", 1);
  const std::string message =
      error_message([] { resolve_timeout(std::chrono::milliseconds(0)); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("EPCOMM_TIMEOUT_S"), std::string::npos) << message;
  unsetenv("EPCOMM_TIMEOUT_S");
  EXPECT_EQ(resolve_timeout(std::chrono::milliseconds(0)), kDefaultTimeout);
}

// inf overflowed to a negative timeout (every wait failed at once); nan, negative values and garbage
// must name the variable too, and so must a negative BufferOptions::timeout.
TEST(Timeout, NonFiniteNegativeOrHugeValuesAreRejected) {
  std::mt19937 rng(std::random_device{}());
  const std::string too_long = std::to_string(400 * 24 * 3600 + int(rng() % 1000));
  for (const std::string bad : {"inf", "-inf", "nan", "-1", "0", "1e400", "2x", " 1", too_long.c_str()}) {
    setenv("EPCOMM_TIMEOUT_S", bad.c_str(), 1);
    const std::string message =
        error_message([] { resolve_timeout(std::chrono::milliseconds(0)); }, ErrorCode::kInvalidArgument);
    EXPECT_NE(message.find("EPCOMM_TIMEOUT_S"), std::string::npos) << bad << ": " << message;
    EXPECT_NE(message.find("'" + bad + "'"), std::string::npos) << message;
  }
  const int seconds = 1 + int(rng() % 1000);
  setenv("EPCOMM_TIMEOUT_S", std::to_string(seconds).c_str(), 1);
  EXPECT_EQ(resolve_timeout(std::chrono::milliseconds(0)).count(), seconds * 1000);
  unsetenv("EPCOMM_TIMEOUT_S");
  const int negative = -1 - int(rng() % 1000);
  const std::string message =
      error_message([&] { resolve_timeout(std::chrono::milliseconds(negative)); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("timeout"), std::string::npos) << message;
  EXPECT_NE(message.find(std::to_string(negative)), std::string::npos) << message;
  error_message([] { resolve_timeout(kMaxTimeout + std::chrono::milliseconds(1)); }, ErrorCode::kInvalidArgument);
}

// ---- the environment table (core/environment.cpp) ----

TEST(Environment, TableIsWellFormed) {
  std::set<std::string> names;
  for (const EnvVariable& v : environment_table()) {
    EXPECT_TRUE(names.insert(v.name).second) << v.name << " is declared twice";
    EXPECT_GT(std::string(v.doc).size(), 10u) << v.name;
    EXPECT_GT(std::string(v.fallback).size(), 0u) << v.name;
    if (v.type == EnvType::kSeconds || v.type == EnvType::kInt) EXPECT_LE(v.min, v.max) << v.name;
    EXPECT_EQ(&environment_variable(v.name), &v);
  }
  error_message([] { environment_variable("EPCOMM_NOT_A_VARIABLE"); }, ErrorCode::kInternal);
  // Reading a variable with another type than declared is a bug of the reader.
  error_message([] { env_int("EPCOMM_TIMEOUT_S"); }, ErrorCode::kInternal);
}

TEST(Environment, ValuesAreParsedWithinTheirRange) {
  std::mt19937 rng(std::random_device{}());
  const EnvVariable& tokens = environment_variable("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS");
  const int value = int(rng() % 100000);
  EXPECT_EQ(parse_int(tokens, std::to_string(value)), value);
  for (const char* bad : {"-1", "12ab", "", "99999999999999999999", "1.5"}) {
    const std::string message = error_message([&] { parse_int(tokens, bad); }, ErrorCode::kInvalidArgument);
    EXPECT_NE(message.find("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS: expected an integer in [0, 2147483647]"),
              std::string::npos)
        << message;
  }
  const EnvVariable& pdl = environment_variable("EPCOMM_LL_PDL");
  EXPECT_TRUE(parse_flag(pdl, "1"));
  EXPECT_FALSE(parse_flag(pdl, "0"));
  const std::string message = error_message([&] { parse_flag(pdl, "yes"); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find("EPCOMM_LL_PDL: expected 0 or 1, got 'yes'"), std::string::npos) << message;
  const EnvVariable& timeout = environment_variable("EPCOMM_TIMEOUT_S");
  const double seconds = 0.5 + rng() % 1000;
  EXPECT_DOUBLE_EQ(parse_seconds(timeout, std::to_string(seconds)), seconds);
}

TEST(Environment, ReadsGoThroughTheTable) {
  const std::string value = std::to_string(std::random_device{}() % 5000);
  setenv("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS", value.c_str(), 1);
  EXPECT_EQ(env_int("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS"), std::stoll(value));
  setenv("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS", "", 1);  // empty = unset
  EXPECT_FALSE(env_int("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS").has_value());
  setenv("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS", "many", 1);
  error_message([] { env_int("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS"); }, ErrorCode::kInvalidArgument);
  unsetenv("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS");
  EXPECT_FALSE(env_int("EPCOMM_LL_DISPATCH_OVERLAP_MAX_TOKENS").has_value());
}

// docs/ENVIRONMENT.md documents every variable of the table (one heading or table row each).
TEST(Environment, EveryVariableIsDocumented) {
  std::ifstream file(EPCOMM_SOURCE_DIR "/docs/ENVIRONMENT.md");
  ASSERT_TRUE(file.good()) << "docs/ENVIRONMENT.md not found";
  std::stringstream text;
  text << file.rdbuf();
  for (const EnvVariable& v : environment_table())
    EXPECT_NE(text.str().find(std::string("`") + v.name + "`"), std::string::npos)
        << v.name << " is not documented in docs/ENVIRONMENT.md";
}

// ...and every variable of the table is used by some code (read, or set for the ranks by the
// launcher): an entry nothing reads documents a knob that does nothing.
TEST(Environment, EveryVariableOfTheTableIsUsed) {
  std::string code;
  for (const char* folder : {"/src", "/tools", "/bench"}) {
    for (const auto& entry : std::filesystem::recursive_directory_iterator(EPCOMM_SOURCE_DIR + std::string(folder))) {
      const std::string path = entry.path().string();
      if (!entry.is_regular_file() || path.ends_with("core/environment.cpp")) continue;
      std::ifstream file(path);
      code.append(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
    }
  }
  ASSERT_NE(code.find("\"EPCOMM_TIMEOUT_S\""), std::string::npos) << "the sources were not found";
  for (const EnvVariable& v : environment_table())
    EXPECT_NE(code.find(std::string("\"") + v.name + "\""), std::string::npos)
        << v.name << " is in the table of core/environment.cpp but no code uses it";
}

// ---- Limits ----

TEST(Limits, CpuBackendHasSpecLimitsAndBothModes) {
  const Limits cpu = backend_limits(BackendKind::kCpu);
  EXPECT_TRUE(cpu.available && cpu.normal_mode && cpu.low_latency_mode && cpu.normal_inter_node);
  EXPECT_EQ(cpu.max_topk, kMaxTopk);
  EXPECT_EQ(cpu.max_low_latency_topk, kMaxLowLatencyTopk);
  EXPECT_EQ(cpu.low_latency_hidden_multiple, kFp8GroupSize);
  EXPECT_EQ(cpu.max_ranks_per_node, 8);
  EXPECT_EQ(cpu.scale_dtypes, (std::vector<DType>{DType::kFloat32, DType::kInt32}));
  EXPECT_TRUE(cpu.use_logfmt);  // docs/LOGFMT.md
  const Limits cuda = backend_limits(BackendKind::kCuda);
  EXPECT_EQ(cuda.available, backend_available(BackendKind::kCuda));
  if (cuda.available) {
    EXPECT_FALSE(cuda.normal_inter_node);
    EXPECT_LT(cuda.max_low_latency_tokens_per_rank, INT32_MAX);
    EXPECT_EQ(cuda.data_alignment_bytes, 16);
  }
}

// bf16 round-to-nearest-even, checked against a reference computed in double: the nearest of the
// two bf16 neighbours, ties to the even one.
TEST(Numerics, Bf16RoundingMatchesNearestEven) {
  std::mt19937 rng(11);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = rng();
    const float value = numerics::bits_float(bits);
    if (std::isnan(value) || (bits & 0x7FFFFFFFu) >= 0x7F7F0000u) continue;  // NaN, inf, or may round to inf
    const uint16_t low = static_cast<uint16_t>(bits >> 16);
    const uint16_t high = static_cast<uint16_t>(low + 1);
    const double d_low = numerics::bf16_to_float(low);
    const double d_high = numerics::bf16_to_float(high);
    const double error_low = std::fabs(double(value) - d_low);
    const double error_high = std::fabs(double(value) - d_high);
    uint16_t expected = error_low < error_high ? low : error_high < error_low ? high : ((low & 1) ? high : low);
    ASSERT_EQ(numerics::float_to_bf16(value), expected) << "bits 0x" << std::hex << bits;
  }
  EXPECT_EQ(numerics::float_to_bf16(std::nanf("")), 0x7FFF);
}

}  // namespace
}  // namespace epcomm
