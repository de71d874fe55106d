// The shared-memory plans of the CUDA high-throughput kernels (src/cuda/normal/pipelines.hpp): pure
// host arithmetic, checked here for every shape the kernels may meet, since a wrong plan only shows
// on a GPU as a hang or corrupt rows.
#include <gtest/gtest.h>

#include "cuda/normal/pipelines.hpp"

namespace epcomm::cuda {
namespace {

// The dynamic shared memory an H100 / H200 block gets next to the kernels' static shared memory.
constexpr int64_t kHopperBudget = 232448 - 4096;

RecordLayout record_of(int hidden, bool fp8, int num_scales, int num_topk) {
  RecordLayout record;
  record.payload_bytes = hidden * (fp8 ? 1 : 2);
  record.num_scales = num_scales;
  record.num_topk = num_topk;
  return record;
}

TEST(NormalPipelines, SplitStagesGivesEveryWorkerTheSameNumberOfStages) {
  for (int max_stages = 0; max_stages <= kMaxStages; ++max_stages) {
    for (int max_workers = 1; max_workers <= 16; ++max_workers) {
      const WorkerSplit split = split_stages(max_stages, max_workers);
      SCOPED_TRACE(testing::Message() << "max_stages " << max_stages << ", max_workers " << max_workers);
      if (max_stages == 0) {
        EXPECT_EQ(split.stages, 0);
        continue;
      }
      ASSERT_GE(split.workers, 1);
      EXPECT_LE(split.workers, max_workers);
      EXPECT_LE(split.stages, max_stages);
      EXPECT_EQ(split.stages % split.workers, 0);
      EXPECT_GE(split.stages, split.workers);
      // Never worse than the largest even share with at least half the workers.
      const int least = std::min(max_stages, (max_workers + 1) / 2);
      EXPECT_GE(split.stages, max_stages / least * least);
    }
  }
  EXPECT_EQ(split_stages(15, 8).workers, 5);
  EXPECT_EQ(split_stages(15, 8).stages, 15);
}

TEST(NormalPipelines, EvenPiecesCoverThePayload) {
  for (int64_t payload = 16; payload <= 70000; payload += 16 * 37) {
    for (int64_t max_piece : {16, 100, 4096, 7168, 9000, 100000}) {
      const int32_t piece = even_piece_bytes(payload, max_piece);
      const int32_t pieces = pieces_of(payload, piece);
      SCOPED_TRACE(testing::Message() << "payload " << payload << ", max piece " << max_piece);
      EXPECT_EQ(piece % 16, 0);
      EXPECT_LE(piece, std::max<int64_t>(16, max_piece));
      EXPECT_LT(int64_t(pieces - 1) * piece, payload);  // every piece holds bytes
      EXPECT_GE(int64_t(pieces) * piece, payload);
    }
  }
  EXPECT_EQ(even_piece_bytes(14336, 9000), 7168);
}

void expect_dispatch_plan_consistent(const RecordLayout& record, int R, int64_t budget) {
  const DispatchPipeline p = plan_dispatch(record, R, budget);
  SCOPED_TRACE(testing::Message() << "record " << record.bytes() << " B, R " << R << ", budget " << budget);
  ASSERT_TRUE(p.valid());
  EXPECT_GE(p.send_stage_bytes, record.bytes() - 16);
  EXPECT_GE(p.recv_stage_bytes, record.bytes());
  EXPECT_EQ(p.send_stage_bytes % kStageAlignment, 0);
  EXPECT_EQ(p.recv_stage_bytes % kStageAlignment, 0);
  EXPECT_EQ(p.send_stages % p.producers, 0);
  EXPECT_EQ(p.recv_stages % p.writers, 0);
  EXPECT_LE(p.send_stages, kMaxStages);
  EXPECT_LE(p.recv_stages, kMaxStages);
  EXPECT_LE(p.producers, std::min(kMaxProducers, kNormalWarps - R));  // warps 0..R-1 are store threads
  EXPECT_LE(p.writers, kNormalWarps - 1);                            // warp 0 is the loader
  EXPECT_LE(p.smem_bytes, budget);
  EXPECT_GE(p.smem_bytes, int64_t(p.send_stages) * p.send_stage_bytes);
  EXPECT_GE(p.smem_bytes, int64_t(p.recv_stages) * p.recv_stage_bytes);
}

void expect_combine_plan_consistent(const RecordLayout& record, int R, int num_bias, int64_t budget) {
  const CombinePipeline p = plan_combine(record, R, num_bias, budget);
  SCOPED_TRACE(testing::Message() << "record " << record.bytes() << " B, R " << R << ", biases " << num_bias
                                  << ", budget " << budget);
  ASSERT_TRUE(p.valid());
  EXPECT_LE(R * p.send_stages, kMaxStages);
  EXPECT_GE(p.send_stage_bytes, p.send_piece_bytes);
  EXPECT_EQ(p.send_stage_bytes % kStageAlignment, 0);
  EXPECT_EQ(p.send_pieces, pieces_of(record.payload_bytes, p.send_piece_bytes));
  EXPECT_EQ(p.recv_pieces, pieces_of(record.payload_bytes, p.recv_piece_bytes));
  EXPECT_EQ(p.recv_slot_bytes, record.meta_bytes() + p.recv_piece_bytes);
  EXPECT_GE(p.recv_unit_bytes, int64_t(R) * p.recv_slot_bytes + int64_t(num_bias) * p.recv_piece_bytes);
  EXPECT_EQ(p.recv_unit_bytes % kStageAlignment, 0);
  EXPECT_EQ(p.recv_units % p.reducers, 0);
  EXPECT_LE(p.recv_units, kMaxStages);
  EXPECT_LE(p.reducers, kNormalWarps - 1);
  EXPECT_EQ(p.num_bias, num_bias);
  EXPECT_LE(p.smem_bytes, budget);
  EXPECT_GE(p.smem_bytes, int64_t(R) * p.send_stages * p.send_stage_bytes);
  EXPECT_GE(p.smem_bytes, int64_t(p.recv_units) * p.recv_unit_bytes);
}

// SPEC §5: hidden sizes up to at least 16384 (bf16), any multiple of 128; K up to 32; G up to 8.
TEST(NormalPipelines, EveryShapeTheSpecPromisesHasAConsistentPlan) {
  for (int R = 1; R <= kMaxNvlRanks; ++R) {
    for (int hidden : {128, 200, 256, 384, 512, 2048, 4096, 7168, 7296, 16384}) {
      for (int K : {0, 1, 8, 32}) {
        expect_dispatch_plan_consistent(record_of(hidden, false, 0, K), R, kHopperBudget);
        if (hidden % 128 == 0) expect_dispatch_plan_consistent(record_of(hidden, true, hidden / 128, K), R, kHopperBudget);
        for (int num_bias = 0; num_bias <= 2; ++num_bias)
          expect_combine_plan_consistent(record_of(hidden, false, 0, K), R, num_bias, kHopperBudget);
      }
    }
  }
}

// The benchmark shape (DeepSeek-V3: hidden 7168, top-8, 8 ranks): what the throughput notes assume.
TEST(NormalPipelines, DeepSeekShapeGetsDeepPipelines) {
  const DispatchPipeline bf16 = plan_dispatch(record_of(7168, false, 0, 8), 8, kHopperBudget);
  EXPECT_GE(bf16.send_stages, 12);
  EXPECT_GE(bf16.recv_stages, 12);
  const DispatchPipeline fp8 = plan_dispatch(record_of(7168, true, 56, 8), 8, kHopperBudget);
  EXPECT_GE(fp8.send_stages, 24);
  EXPECT_GE(fp8.recv_stages, 24);
  const CombinePipeline combine = plan_combine(record_of(7168, false, 0, 8), 8, 0, kHopperBudget);
  EXPECT_GE(combine.send_stages, 4);
  EXPECT_GE(combine.recv_units, 3);
}

TEST(NormalPipelines, RecordsTooLargeForSharedMemoryHaveNoPlan) {
  EXPECT_FALSE(plan_dispatch(record_of(160 * 1024, false, 0, 8), 8, kHopperBudget).valid());
  EXPECT_TRUE(plan_dispatch(record_of(48 * 1024, false, 0, 8), 8, kHopperBudget).valid());
}

}  // namespace
}  // namespace epcomm::cuda
