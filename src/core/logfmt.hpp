// LogFMT: the compact log-domain row format of low-latency combine with use_logfmt=True (SPEC §4.2).
// The exact encoding is documented in docs/LOGFMT.md; in short, per block of 128 bf16 values:
//   - the magnitude bits of a bf16 (bits & 0x7FFF) are a piecewise-linear log2 of the value in
//     units of 1/128 octave, so the format works on those 15-bit integers and never calls log/exp;
//   - metadata: the block's largest finite magnitude `top` and a step shift s in [0, 3];
//   - each value: a 10-bit code, sign bit 9, level c in bits 0..8: c = 0 is zero (NaN when the sign
//     bit is set), else magnitude = top - ((511 - c) << s).
// Everything is integer arithmetic on bits, so CPU and GPU encode and decode bit-identically.
// Every function is __host__ __device__ (numerics.hpp's EPCOMM_HOST_DEVICE).
#pragma once

#include <cstdint>

#include "core/numerics.hpp"

namespace epcomm::logfmt {

constexpr int kBlockValues = 128;                          // values per block (the FP8 group size)
constexpr int kLevels = 511;                               // non-zero levels per sign
constexpr int kMaxShift = 3;                               // coarsest step: 8/128 octave
constexpr int kCodeBytesPerBlock = kBlockValues * 10 / 8;  // 160: low bytes, then high bits
constexpr int kMetaBytesPerBlock = 4;
constexpr uint16_t kMagnitudeMask = 0x7FFF;
constexpr uint16_t kFiniteLimit = 0x7F80;  // magnitudes >= this are Inf or NaN
constexpr uint16_t kNanCode = 0x200;       // sign set, level 0
constexpr uint16_t kDecodedNan = 0x7FC0;

// Bytes of one encoded row of `hidden` values (hidden % 128 == 0): every block's 160 code bytes,
// then every block's 4 metadata bytes, padded to 16 bytes.
EPCOMM_HOST_DEVICE int64_t row_bytes(int64_t hidden) {
  const int64_t blocks = hidden / kBlockValues;
  const int64_t bytes = blocks * (kCodeBytesPerBlock + kMetaBytesPerBlock);
  return (bytes + 15) / 16 * 16;
}

// The per-block metadata word: top in bits 0..14, shift in bits 16..17.
struct BlockMeta {
  uint16_t top = 0;  // largest finite magnitude of the block (bf16 bits without the sign)
  int shift = 0;     // the step between levels is 2^shift magnitude units
};

EPCOMM_HOST_DEVICE uint32_t pack_meta(BlockMeta meta) { return uint32_t(meta.top) | (uint32_t(meta.shift) << 16); }

EPCOMM_HOST_DEVICE BlockMeta unpack_meta(uint32_t word) {
  BlockMeta meta;
  meta.top = static_cast<uint16_t>(word & kMagnitudeMask);
  meta.shift = static_cast<int>((word >> 16) & 0x3u);
  return meta;
}

// How many steps of 2^shift `distance` magnitude units is, rounded half up.
EPCOMM_HOST_DEVICE uint32_t steps(uint32_t distance, int shift) {
  const uint32_t half = shift > 0 ? (1u << (shift - 1)) : 0u;
  return (distance + half) >> shift;
}

// The metadata of one block from the largest and the smallest non-zero finite magnitudes in it
// (top = 0 when it has none): the finest step whose 510 steps below `top` reach `smallest`,
// else the coarsest (smaller values then flush to zero, more than 31 octaves below top).
EPCOMM_HOST_DEVICE BlockMeta choose_meta(uint16_t largest, uint16_t smallest) {
  BlockMeta meta;
  meta.top = largest;
  if (largest == 0) return meta;
  const uint32_t range = uint32_t(largest) - smallest;
  meta.shift = kMaxShift;
  for (int shift = 0; shift < kMaxShift; ++shift) {
    if (steps(range, shift) <= uint32_t(kLevels - 1)) {
      meta.shift = shift;
      break;
    }
  }
  return meta;
}

// Folds one bf16 value into a block's (largest, smallest) non-zero finite magnitudes.
EPCOMM_HOST_DEVICE void observe(uint16_t bf16, uint16_t& largest, uint16_t& smallest) {
  const uint16_t magnitude = bf16 & kMagnitudeMask;
  if (magnitude == 0 || magnitude >= kFiniteLimit) return;
  if (magnitude > largest) largest = magnitude;
  if (magnitude < smallest) smallest = magnitude;
}

// The 10-bit code of one bf16 value in a block with `meta`. Inf and NaN become the NaN code; values
// more than 510 steps below top (or whose level would fall below magnitude 0) become zero.
EPCOMM_HOST_DEVICE uint16_t encode_value(uint16_t bf16, BlockMeta meta) {
  const uint16_t sign = static_cast<uint16_t>((bf16 >> 15) << 9);
  const uint16_t magnitude = bf16 & kMagnitudeMask;
  if (magnitude >= kFiniteLimit) return kNanCode;
  if (magnitude == 0) return 0;
  const uint32_t distance = steps(uint32_t(meta.top) - magnitude, meta.shift);
  if (distance > uint32_t(kLevels - 1) || (distance << meta.shift) >= meta.top) return 0;
  return static_cast<uint16_t>(sign | (kLevels - distance));
}

// The bf16 bits a 10-bit code stands for in a block with `meta` (zero is +0).
EPCOMM_HOST_DEVICE uint16_t decode_value(uint16_t code, BlockMeta meta) {
  const uint32_t level = code & 0x1FFu;
  if (level == 0) return (code & 0x200u) ? kDecodedNan : uint16_t(0);
  const uint32_t magnitude = uint32_t(meta.top) - ((uint32_t(kLevels) - level) << meta.shift);
  return static_cast<uint16_t>(((code & 0x200u) << 6) | magnitude);
}

// Code j of a block: its low 8 bits at byte j, its high 2 bits at bits 2 * (j % 4) of byte
// 128 + j / 4 (so a GPU lane that owns values 4i..4i+3 reads one 4-byte word and one byte).
EPCOMM_HOST_DEVICE void store_code(uint8_t* block_codes, int j, uint16_t code) {
  block_codes[j] = static_cast<uint8_t>(code & 0xFFu);
  uint8_t& high = block_codes[kBlockValues + j / 4];
  const int shift = 2 * (j % 4);
  high = static_cast<uint8_t>((high & ~(0x3u << shift)) | (((code >> 8) & 0x3u) << shift));
}

EPCOMM_HOST_DEVICE uint16_t load_code(const uint8_t* block_codes, int j) {
  const uint32_t high = (block_codes[kBlockValues + j / 4] >> (2 * (j % 4))) & 0x3u;
  return static_cast<uint16_t>(block_codes[j] | (high << 8));
}

// Encodes a row of `hidden` bf16 values (hidden % 128 == 0) into row_bytes(hidden) bytes at `out`
// (padding bytes are zeroed). The metadata word of block b sits at byte blocks * 160 + 4 * b,
// little-endian.
EPCOMM_HOST_DEVICE void encode_row(const uint16_t* row, int64_t hidden, uint8_t* out) {
  const int64_t blocks = hidden / kBlockValues;
  uint8_t* meta_bytes = out + blocks * kCodeBytesPerBlock;
  for (int64_t i = blocks * (kCodeBytesPerBlock + kMetaBytesPerBlock); i < row_bytes(hidden); ++i) out[i] = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* values = row + b * kBlockValues;
    uint16_t largest = 0, smallest = kMagnitudeMask;
    for (int j = 0; j < kBlockValues; ++j) observe(values[j], largest, smallest);
    const BlockMeta meta = choose_meta(largest, smallest);
    uint8_t* codes = out + b * kCodeBytesPerBlock;
    for (int j = 0; j < kBlockValues / 4; ++j) codes[kBlockValues + j] = 0;
    for (int j = 0; j < kBlockValues; ++j) store_code(codes, j, encode_value(values[j], meta));
    const uint32_t word = pack_meta(meta);
    for (int i = 0; i < 4; ++i) meta_bytes[4 * b + i] = static_cast<uint8_t>(word >> (8 * i));
  }
}

// Decodes row_bytes(hidden) bytes written by encode_row into `hidden` bf16 values.
EPCOMM_HOST_DEVICE void decode_row(const uint8_t* in, int64_t hidden, uint16_t* row) {
  const int64_t blocks = hidden / kBlockValues;
  const uint8_t* meta_bytes = in + blocks * kCodeBytesPerBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    uint32_t word = 0;
    for (int i = 0; i < 4; ++i) word |= uint32_t(meta_bytes[4 * b + i]) << (8 * i);
    const BlockMeta meta = unpack_meta(word);
    const uint8_t* codes = in + b * kCodeBytesPerBlock;
    for (int j = 0; j < kBlockValues; ++j) row[b * kBlockValues + j] = decode_value(load_code(codes, j), meta);
  }
}

}  // namespace epcomm::logfmt
