// One micro-batch of low-latency traffic as seen by one rank: dispatch (send, then receive with or
// without a hook), the "experts" writing combine's x, combine (send, receive), each checked against
// the naive reference of low_latency_reference.hpp. Tests string them together in various orders.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "reference/low_latency_reference.hpp"

namespace epcomm::testing {

struct CombineVariant {
  bool hook = false;
  bool zero_copy = false;  // write x into next_low_latency_combine_buffer()
  bool out = false;        // pass out=
};

class MicroBatch {
 public:
  MicroBatch(const LowLatencyCase& c, RecvFormat format, int rank, std::vector<bool> masked = {})
      : c_(c), format_(format), rank_(rank), all_(all_inputs(c)), masked_(std::move(masked)) {
    if (masked_.empty()) masked_.assign(c.num_ranks, false);
    auto rng = rng_for(c.seed, 777 + rank);
    std::uniform_int_distribution<int> start(0, 1000);
    recv_stats_.resize(c.num_local_experts());
    for (int32_t& v : recv_stats_) v = start(rng);
    dispatch_wait_.resize(c.num_ranks);
    combine_wait_.resize(c.num_ranks);
    for (int64_t& v : dispatch_wait_) v = start(rng);
    for (int64_t& v : combine_wait_) v = start(rng);
  }

  RankInputs& mine() { return all_[rank_]; }
  const LowLatencyDispatchResult& dispatched() const { return dispatched_; }
  const LowLatencyCombineResult& combined() const { return combined_; }
  const std::vector<int64_t>& dispatch_wait() const { return dispatch_wait_; }
  const std::vector<int64_t>& combine_wait() const { return combine_wait_; }

  void dispatch_send(Buffer& buffer, bool hook) {
    recv_stats_before_ = recv_stats_;
    dispatch_wait_before_ = dispatch_wait_;
    LowLatencyDispatchInputs in = dispatch_inputs(c_, mine(), format_);
    in.cumulative_local_expert_recv_stats =
        TensorView::contiguous(recv_stats_.data(), DType::kInt32, {c_.num_local_experts()}, Device::cpu());
    in.dispatch_wait_recv_cost_stats =
        TensorView::contiguous(dispatch_wait_.data(), DType::kInt64, {c_.num_ranks}, Device::cpu());
    LowLatencyOptions options;
    options.return_recv_hook = hook;
    options.allocator = &poison_;
    dispatched_ = buffer.low_latency_dispatch(in, options);
    EXPECT_EQ(bool(dispatched_.hook), hook);
    // The send half took its own copy: what the caller does with x afterwards does not matter.
    scribble(mine().x.data(), mine().x.size());
  }

  void dispatch_finish() {
    if (dispatched_.hook) dispatched_.hook();
    all_[rank_] = make_inputs(c_, rank_);  // undo the scribble for the reference
    check_dispatch_shapes(c_, format_, dispatched_);
    check_dispatch(c_, all_, rank_, format_, dispatched_, masked_);
    for (int l = 0; l < c_.num_local_experts(); ++l)
      EXPECT_EQ(recv_stats_[l], recv_stats_before_[l] + dispatched_.recv_count.data_as<int32_t>()[l])
          << "cumulative_local_expert_recv_stats[" << l << "]";
    check_wait_stats(dispatch_wait_before_, dispatch_wait_, "dispatch_wait_recv_cost_stats");
  }

  void combine_send(Buffer& buffer, const CombineVariant& variant) {
    const int64_t L = c_.num_local_experts(), rows = c_.rows(), H = c_.hidden;
    x_.assign(L * rows * H, 0);
    if (variant.zero_copy) {
      const TensorView staging = buffer.next_low_latency_combine_buffer(dispatched_.handle);
      EXPECT_EQ(staging.dtype, DType::kBFloat16);
      EXPECT_EQ(staging.numel(), L * rows * H);
      fill_expert_outputs(c_, rank_, dispatched_, staging.data_as<uint16_t>());
      // With zero_copy the data comes from the buffer: x's own memory must not be read.
      std::fill(x_.begin(), x_.end(), uint16_t(0x7FC0));
      zero_copy_staging_ = staging;
    } else {
      fill_expert_outputs(c_, rank_, dispatched_, x_.data());
    }
    combine_wait_before_ = combine_wait_;
    LowLatencyCombineInputs in;
    in.x = TensorView::contiguous(x_.data(), DType::kBFloat16, {L, rows, H}, Device::cpu());
    in.topk_idx =
        TensorView::contiguous(mine().topk_idx.data(), DType::kInt64, {mine().num_tokens, c_.num_topk}, Device::cpu());
    in.topk_weights = TensorView::contiguous(mine().topk_weights.data(), DType::kFloat32,
                                             {mine().num_tokens, c_.num_topk}, Device::cpu());
    in.handle = &dispatched_.handle;
    in.zero_copy = variant.zero_copy;
    in.combine_wait_recv_cost_stats =
        TensorView::contiguous(combine_wait_.data(), DType::kInt64, {c_.num_ranks}, Device::cpu());
    out_.assign(int64_t(mine().num_tokens) * H, 0xA5A5);
    if (variant.out)
      in.out = TensorView::contiguous(out_.data(), DType::kBFloat16, {mine().num_tokens, H}, Device::cpu());
    LowLatencyOptions options;
    options.return_recv_hook = variant.hook;
    options.allocator = &poison_;
    variant_ = variant;
    combined_ = buffer.low_latency_combine(in, options);
    EXPECT_EQ(bool(combined_.hook), variant.hook);
    // The send half took its own copy of the rows: x (or the staging buffer) may change now.
    if (variant.zero_copy) {
      scribble(zero_copy_staging_.data_as<uint16_t>(), zero_copy_staging_.numel());
    } else {
      scribble(x_.data(), x_.size());
    }
  }

  void combine_finish() {
    if (combined_.hook) combined_.hook();
    check_combine(c_, mine(), rank_, combined_.combined_x, masked_);
    if (variant_.out) {
      EXPECT_EQ(combined_.combined_x.data, static_cast<void*>(out_.data()));
    }
    check_wait_stats(combine_wait_before_, combine_wait_, "combine_wait_recv_cost_stats");
  }

 private:
  static void scribble(uint16_t* data, int64_t count) {
    for (int64_t i = 0; i < count; ++i) data[i] = 0x7FC0;
  }

  // Waiting only adds time. (Whether a masked rank's entry may grow depends on how it got masked:
  // the tests that mask ranks check that themselves.)
  void check_wait_stats(const std::vector<int64_t>& before, const std::vector<int64_t>& after, const char* name) {
    for (int r = 0; r < c_.num_ranks; ++r) EXPECT_GE(after[r], before[r]) << name << "[" << r << "]";
  }

  LowLatencyCase c_;
  RecvFormat format_;
  int rank_;
  std::vector<RankInputs> all_;
  std::vector<bool> masked_;
  PoisonAllocator poison_;
  std::vector<int32_t> recv_stats_, recv_stats_before_;
  std::vector<int64_t> dispatch_wait_, dispatch_wait_before_, combine_wait_, combine_wait_before_;
  std::vector<uint16_t> x_, out_;
  TensorView zero_copy_staging_;
  CombineVariant variant_;
  LowLatencyDispatchResult dispatched_;
  LowLatencyCombineResult combined_;
};

}  // namespace epcomm::testing
