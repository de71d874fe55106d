#include "moe_data.hpp"

#include <algorithm>
#include <cstring>

#include "core/numerics.hpp"

namespace epcomm::testing {

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t seed_for(uint64_t case_seed, int rank, int purpose) {
  Rng rng(case_seed * 1000003ull + uint64_t(rank) * 7919ull + uint64_t(purpose));
  return rng.next();
}

namespace {

bool contains(const int64_t* slots, int count, int64_t expert) {
  return std::find(slots, slots + count, expert) != slots + count;
}

// An expert not yet in `slots`, from [first, first + count) if that range still has one.
int64_t draw_distinct(Rng& rng, const int64_t* slots, int chosen, int64_t first, int64_t count) {
  if (count <= chosen) {  // the range may be exhausted: scan it
    for (int64_t e = first; e < first + count; ++e)
      if (!contains(slots, chosen, e)) return e;
    return -1;
  }
  for (;;) {
    const int64_t e = first + int64_t(rng.next() % uint64_t(count));
    if (!contains(slots, chosen, e)) return e;
  }
}

int64_t draw_expert(Rng& rng, const int64_t* slots, int chosen, int num_experts, RoutingKind kind) {
  if (kind == RoutingKind::kUniform) return draw_distinct(rng, slots, chosen, 0, num_experts);
  // Skewed: the first 20% of the experts (so the first ranks) take 80% of the selections.
  const int64_t hot = std::max<int64_t>(1, num_experts / 5);
  const bool want_hot = rng.uniform() < 0.8;
  int64_t e =
      want_hot ? draw_distinct(rng, slots, chosen, 0, hot) : draw_distinct(rng, slots, chosen, hot, num_experts - hot);
  if (e < 0) e = draw_distinct(rng, slots, chosen, 0, num_experts);
  return e;
}

}  // namespace

std::vector<int64_t> make_topk_idx(Rng& rng, int num_tokens, int num_topk, int num_experts, RoutingKind kind,
                                   double empty_fraction) {
  std::vector<int64_t> idx(size_t(num_tokens) * num_topk);
  for (int t = 0; t < num_tokens; ++t) {
    int64_t* slots = &idx[size_t(t) * num_topk];
    for (int k = 0; k < num_topk; ++k) slots[k] = draw_expert(rng, slots, k, num_experts, kind);
    for (int k = 0; k < num_topk; ++k)
      if (rng.uniform() < empty_fraction) slots[k] = -1;
  }
  return idx;
}

std::vector<float> make_topk_weights(Rng& rng, int num_tokens, int num_topk) {
  std::vector<float> weights(size_t(num_tokens) * num_topk);
  for (float& w : weights) w = 0.05f + static_cast<float>(rng.uniform());
  return weights;
}

namespace {

// 2^-16 .. 2^7: sums of a few such values need more than float's 24 bits, so they round.
uint16_t random_bf16_from(uint32_t bits) {
  const uint32_t sign = (bits & 1u) << 15;
  const uint32_t exponent = 127 - 16 + ((bits >> 1) & 31u) % 24;
  const uint32_t mantissa = (bits >> 6) & 0x7Fu;
  return static_cast<uint16_t>(sign | (exponent << 7) | mantissa);
}

uint16_t order_sensitive_from(uint32_t bits) {
  const uint32_t sign = (bits & 1u) << 15;
  const uint32_t large = ((127u + 12) << 7) | (((bits >> 2) & 1u) << 6);                  // 1.0 or 1.5 x 2^12
  const uint32_t small = ((127u - 8 + ((bits >> 3) & 7u)) << 7) | ((bits >> 6) & 0x7Fu);  // 2^-8 .. 2^0
  return static_cast<uint16_t>(sign | ((bits & 2u) ? large : small));
}

// Fills `values` four at a time from one 64-bit draw (rows of DeepSeek's shape are large).
template <class Make>
void fill_from_bits(Rng& rng, uint16_t* values, size_t count, Make make) {
  size_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const uint64_t bits = rng.next();
    for (size_t j = 0; j < 4; ++j) values[i + j] = make(static_cast<uint32_t>(bits >> (16 * j)) & 0xFFFFu);
  }
  for (; i < count; ++i) values[i] = make(rng.next16());
}

}  // namespace

uint16_t random_bf16(Rng& rng) { return random_bf16_from(rng.next16()); }

uint16_t order_sensitive_bf16(Rng& rng) { return order_sensitive_from(rng.next16()); }

void fill_order_sensitive(Rng& rng, std::span<uint16_t> row) {
  fill_from_bits(rng, row.data(), row.size(), order_sensitive_from);
}

std::vector<uint16_t> make_tagged_bf16(Rng& rng, int rank, int num_tokens, int hidden) {
  std::vector<uint16_t> x(size_t(num_tokens) * hidden);
  for (int t = 0; t < num_tokens; ++t) {
    uint16_t* row = &x[size_t(t) * hidden];
    fill_from_bits(rng, row, hidden, random_bf16_from);
    const float tags[3] = {float(rank + 1), float(t / 256 + 1), float(t % 256 + 1)};
    for (int h = 0; h < std::min(hidden, 3); ++h) row[h] = numerics::float_to_bf16(tags[h]);
  }
  return x;
}

std::string describe_tagged_row(const uint16_t* row) {
  const float tags[3] = {numerics::bf16_to_float(row[0]), numerics::bf16_to_float(row[1]),
                         numerics::bf16_to_float(row[2])};
  for (float tag : tags)
    if (!(tag >= 1.0f && tag <= 256.0f && tag == float(int(tag)))) return "(untagged row)";
  return "(rank " + std::to_string(int(tags[0]) - 1) + ", token " +
         std::to_string((int(tags[1]) - 1) * 256 + int(tags[2]) - 1) + ")";
}

std::vector<uint8_t> make_fp8(Rng& rng, int num_tokens, int hidden) {
  std::vector<uint8_t> x(size_t(num_tokens) * hidden);
  for (uint8_t& v : x) {
    do v = static_cast<uint8_t>(rng.next());
    while ((v & 0x7F) == 0 || (v & 0x7F) == 0x7F);  // no zero, no NaN
  }
  return x;
}

std::vector<float> make_tagged_scales(Rng& rng, int rank, int num_tokens, int num_scales) {
  std::vector<float> scales(size_t(num_tokens) * num_scales);
  for (int t = 0; t < num_tokens; ++t)
    for (int s = 0; s < num_scales; ++s)
      scales[size_t(t) * num_scales + s] =
          s == 0 ? float(rank * 65536 + t + 1) : float(1 + rng.below(1 << 20)) * 0x1.0p-26f;
  return scales;
}

Tensor PoisonAllocator::allocate(DType dtype, std::span<const int64_t> shape, Device device, StreamHandle stream) {
  Tensor t = default_allocator().allocate(dtype, shape, device, stream);
  std::memset(t.data, 0xA5, t.nbytes());
  return t;
}

}  // namespace epcomm::testing
