#include "cpu/normal_mode.hpp"

#include <cstring>

#include "core/allocate.hpp"
#include "core/check.hpp"
#include "core/semantics.hpp"
#include "cpu/normal_combine.hpp"
#include "cpu/normal_dispatch.hpp"
#include "cpu/normal_handle.hpp"
#include "cpu/normal_internode_combine.hpp"
#include "cpu/normal_internode_dispatch.hpp"
#include "cpu/normal_routing.hpp"

namespace epcomm::cpu {
namespace {

// A new tensor holding a copy of `values` (bytes in row-major order).
template <class T>
Tensor tensor_of(Allocator& allocator, DType dtype, std::initializer_list<int64_t> shape, const std::vector<T>& values,
                 StreamHandle stream) {
  Tensor t = allocate(allocator, dtype, shape, Device::cpu(), stream);
  if (!values.empty()) std::memcpy(t.data, values.data(), values.size() * sizeof(T));
  return t;
}

Tensor int32_tensor(Allocator& allocator, const std::vector<int32_t>& values, StreamHandle stream) {
  return tensor_of(allocator, DType::kInt32, {int64_t(values.size())}, values, stream);
}

Tensor flags_tensor(Allocator& allocator, const Routing& routing, StreamHandle stream) {
  return tensor_of(allocator, DType::kBool, {routing.num_tokens, routing.num_ranks}, routing.in_rank, stream);
}

// recv_x_scales keeps the dtype (float32 or int32 UE8M0-packed) and the majorness of x_scales:
// row-major in -> [rows, S] contiguous; otherwise column-major [rows, S].
Tensor allocate_scales(Allocator& allocator, const TensorView& x_scales, int rows, int num_scales,
                       StreamHandle stream) {
  if (x_scales.stride(1) == 1) return allocate(allocator, x_scales.dtype, {rows, num_scales}, Device::cpu(), stream);
  return allocate_column_major(allocator, x_scales.dtype, {rows, num_scales}, Device::cpu(), stream);
}

// The header every dispatch publishes; `kind`-specific fields are filled by the caller.
CallHeader dispatch_header(const DispatchArgs& args, CallKind kind) {
  CallHeader header;
  header.kind = kind;
  header.num_tokens = args.num_tokens;
  header.hidden = args.hidden;
  header.x_dtype = static_cast<int32_t>(args.inputs->x.dtype);
  header.num_scales = args.num_scales;
  return header;
}

TokenRecord token_record(const DispatchArgs& args, int num_ranks, bool with_topk) {
  TokenRecord record;
  record.x_bytes = size_t(args.hidden) * dtype_size(args.inputs->x.dtype);
  record.num_scales = args.num_scales;
  record.num_topk = with_topk ? args.num_topk : 0;
  record.has_weights = with_topk && args.inputs->topk_weights.has_value();
  record.num_ranks = num_ranks;
  return record;
}

std::vector<int32_t> tokens_of_every_rank(const std::vector<PeerCall>& calls) {
  std::vector<int32_t> num_tokens;
  for (const PeerCall& call : calls) num_tokens.push_back(call.header.num_tokens);
  return num_tokens;
}

// [i][j] = tokens rank j receives from ranks 0..i (SPEC §3.2); counts[j] of rank i's call.
std::vector<int32_t> rank_prefix_matrix(const std::vector<PeerCall>& calls) {
  return semantics::rank_prefix_matrix([&](int i, int j) { return calls[i].counts[j]; },
                                       static_cast<int>(calls.size()));
}

// Every rank checks every receiver, so all raise together when one receives too many tokens.
void check_worst_tokens(const std::vector<PeerCall>& calls, const std::vector<int32_t>& prefix, int rank) {
  const int R = static_cast<int>(calls.size());
  for (int offset = 0; offset < R; ++offset) {
    const int r = (rank + offset) % R;  // our own rank first: its message is the most useful
    const int worst = calls[r].header.num_worst_tokens;
    const int received = prefix[(R - 1) * R + r];
    if (worst > 0 && received > worst)
      throw_error(ErrorCode::kOutOfCapacity,
                  concat("dispatch: num_worst_tokens: ", r == rank ? "this rank" : "rank", " (", r, ") receives ",
                         received, " tokens, more than its num_worst_tokens = ", worst));
  }
}

// send_row[t][r] = row of token t in rank r's recv_x, or -1.
std::vector<int32_t> send_rows(const Routing& routing, const std::vector<int32_t>& prefix, int rank) {
  return semantics::send_rows([&](int t, int r) { return routing.goes_to(t, r); }, prefix, routing.num_tokens,
                              routing.num_ranks, rank);
}

// Entry l: (token, slot) pairs received for local expert l, rounded up to `alignment`.
std::vector<int> recv_tokens_per_expert(const std::vector<PeerCall>& calls, int rank, int num_local_experts,
                                        int alignment) {
  const int R = static_cast<int>(calls.size());
  std::vector<int> per_expert(num_local_experts, 0);
  for (const PeerCall& call : calls)
    for (int l = 0; l < num_local_experts; ++l) per_expert[l] += call.counts[R + rank * num_local_experts + l];
  for (int& count : per_expert) count = semantics::aligned_count(count, alignment);
  return per_expert;
}

// N > 1 (SPEC §3.6): the prefix sums of the rows `rank` received, over source ranks (column `rank`
// of rank_prefix_matrix) and over source nodes.
void add_internode_fields(DispatchHandle& handle, const std::vector<int32_t>& prefix, const GroupGeometry& g,
                          Allocator& allocator, StreamHandle stream) {
  const int R = g.num_ranks;
  const std::vector<int32_t> per_rank = semantics::recv_rank_prefix_sum(prefix, R, g.rank);
  std::vector<int32_t> per_node(g.num_nodes());
  for (int n = 0; n < g.num_nodes(); ++n) per_node[n] = per_rank[(n + 1) * g.ranks_per_node - 1];
  handle.recv_gbl_rank_prefix_sum = int32_tensor(allocator, per_rank, stream);
  handle.recv_rdma_rank_prefix_sum = int32_tensor(allocator, per_node, stream);
}

// Checks the area holds one token's round, for the transport the group's node count selects.
void check_dispatch_area(const Area& area, const GroupGeometry& g, const TokenRecord& record, const char* op) {
  if (g.num_nodes() == 1) return check_area_fits(area, record.bytes(), op, "one token record");
  check_area_fits(area, internode_dispatch_min_bytes(record, g.num_nodes()), op,
                  "one token record, with one inbox slot per other node");
}

// Moves the tokens in one level (N == 1) or two (N > 1); returns the network bytes per node (N > 1).
std::vector<int64_t> transport_tokens(const Area& area, GroupSync& sync, const GroupGeometry& g,
                                      const TokenRecord& record, const DispatchSend& send, DispatchReceive& receive,
                                      const std::vector<int32_t>& num_tokens, const char* op) {
  if (g.num_nodes() > 1) return move_tokens_across_nodes(area, sync, g, record, send, receive, num_tokens, op);
  move_tokens(area, sync, g.rank, record, send, receive, num_tokens, op);
  return {};
}

// The handle of a fresh dispatch whose outputs have `rows` rows.
std::shared_ptr<DispatchHandle> make_handle(const DispatchArgs& args, const Routing& routing,
                                            const std::vector<PeerCall>& calls, const std::vector<int32_t>& prefix,
                                            int rank, int rows, uint64_t dispatch_step, uint64_t buffer_id,
                                            StreamHandle stream) {
  Allocator& allocator = *args.allocator;
  const int R = routing.num_ranks;
  auto handle = std::make_shared<DispatchHandle>();
  handle->num_ranks = R;
  handle->num_tokens = args.num_tokens;
  handle->num_recv_tokens = rows;
  handle->num_topk = args.num_topk;
  handle->rank_prefix_matrix = tensor_of(allocator, DType::kInt32, {R, R}, prefix, stream);
  handle->is_token_in_rank = flags_tensor(allocator, routing, stream);
  handle->send_row =
      tensor_of(allocator, DType::kInt32, {args.num_tokens, R}, send_rows(routing, prefix, rank), stream);
  handle->recv_src_idx = allocate(allocator, DType::kInt32, {rows}, Device::cpu(), stream);  // written by move_tokens
  handle->backend_state =
      std::make_shared<NormalHandleState>(NormalHandleState{dispatch_step, tokens_of_every_rank(calls)});
  handle->buffer_id = buffer_id;
  return handle;
}

// Outputs of a dispatch with the handle's rows and routing; `record` says which travel.
DispatchReceive allocate_receive(const DispatchArgs& args, const TokenRecord& record, const DispatchHandle& handle,
                                 int rank, DispatchResult& result, StreamHandle stream) {
  Allocator& allocator = *args.allocator;
  const int rows = handle.num_recv_tokens;
  DispatchReceive receive;
  receive.num_rows = rows;
  for (int s = 0; s < handle.num_ranks; ++s) {
    receive.first_row.push_back(first_row_from(handle, s, rank));
    receive.end_row.push_back(first_row_from(handle, s + 1, rank));
  }
  result.recv_x = allocate(allocator, args.inputs->x.dtype, {rows, args.hidden}, Device::cpu(), stream);
  receive.x = static_cast<std::byte*>(result.recv_x.data);
  if (args.fp8) {
    result.recv_x_scales = allocate_scales(allocator, *args.inputs->x_scales, rows, args.num_scales, stream);
    receive.scales = *result.recv_x_scales;
  }
  if (record.num_topk > 0) {
    result.recv_topk_idx = allocate(allocator, DType::kInt64, {rows, record.num_topk}, Device::cpu(), stream);
    receive.topk_idx = result.recv_topk_idx->data_as<int64_t>();
    const int L = args.num_experts / handle.num_ranks;
    receive.rank = rank;
    receive.num_local_experts = L;
  }
  if (record.has_weights) {
    result.recv_topk_weights = allocate(allocator, DType::kFloat32, {rows, record.num_topk}, Device::cpu(), stream);
    receive.topk_weights = result.recv_topk_weights->data_as<float>();
  }
  return receive;
}

// The rows of this rank's recv_x that the handle's rank_prefix_matrix assigns to each source: a
// user-visible tensor, so it is checked before anything is indexed by it.
void check_handle_rows(const DispatchHandle& handle, int rank, const char* op) {
  int32_t previous = 0;
  for (int s = 1; s <= handle.num_ranks; ++s) {
    const int32_t end = first_row_from(handle, s, rank);
    require(end >= previous && end <= handle.num_recv_tokens, op, "handle", "rank_prefix_matrix[", s - 1, ", ", rank,
            "] = ", end, " is not a row count between ", previous, " and ", handle.num_recv_tokens,
            ": the handle was modified");
    previous = end;
  }
}

// Combine publishes, per source, the rows whose recv_src_idx lies in a window of source tokens,
// sized for at most one row per token: the (user-visible) indices must rise strictly within each
// source's rows and name tokens the source has.
void check_handle_sources(const DispatchHandle& handle, int rank, const char* op) {
  const auto* src_idx = handle.recv_src_idx.data_as<const int32_t>();
  const std::vector<int32_t>& num_tokens = handle_state(handle).num_tokens;
  for (int s = 0; s < handle.num_ranks; ++s) {
    int64_t previous = -1;
    for (int32_t row = first_row_from(handle, s, rank); row < first_row_from(handle, s + 1, rank); ++row) {
      require(src_idx[row] > previous && src_idx[row] < num_tokens[s], op, "handle", "recv_src_idx[", row,
              "] = ", src_idx[row], " is not a rising token index below rank ", s, "'s T = ", num_tokens[s],
              ": the handle was modified");
      previous = src_idx[row];
    }
  }
}

}  // namespace

std::vector<PeerCall> NormalMode::exchange(CallHeader header, std::span<const int32_t> counts, const char* op,
                                           std::string_view message) {
  header.call_number = ++last_call_number_;
  return exchange_calls(area_, *ctx_.sync, ctx_.geometry.rank, header, counts, op, message);
}

void NormalMode::reject(CallKind kind, const Error& error) {
  CallHeader header;
  header.kind = kind;
  header.rejected = static_cast<int32_t>(error.code());
  const char* op = to_string(kind);
  check_same_call(exchange(header, {}, op, rejection_text(error)), ctx_.geometry.rank, op);
}

template <class Local>
auto NormalMode::before_exchange(CallKind kind, Local&& local) {
  try {
    return local();
  } catch (const Error& error) {
    reject(kind, error);
    throw;
  }
}

LayoutResult NormalMode::layout(const LayoutArgs& args, Allocator& allocator, StreamHandle stream) const {
  const GroupGeometry& g = ctx_.geometry;
  const Routing routing = route_by_topk(args.topk_idx, g.num_ranks, args.num_experts, "get_dispatch_layout");
  LayoutResult result;
  result.num_tokens_per_rank = int32_tensor(allocator, routing.per_rank, stream);
  if (g.num_nodes() > 1) result.num_tokens_per_rdma_rank = int32_tensor(allocator, tokens_per_node(routing, g), stream);
  result.num_tokens_per_expert = int32_tensor(allocator, routing.per_expert, stream);
  result.is_token_in_rank = flags_tensor(allocator, routing, stream);
  return result;
}

DispatchResult NormalMode::dispatch(const DispatchArgs& args, StreamHandle stream) {
  return args.cached ? cached_dispatch(args, stream) : fresh_dispatch(args, stream);
}

DispatchResult NormalMode::fresh_dispatch(const DispatchArgs& args, StreamHandle stream) {
  const char* op = "dispatch";
  const int R = ctx_.geometry.num_ranks, rank = ctx_.geometry.rank;
  const DispatchInputs& in = *args.inputs;
  // Local checks first: a bad input is rejected in the exchange, so that every rank raises it.
  const TokenRecord record = token_record(args, R, /*with_topk=*/true);
  const Routing routing = before_exchange(CallKind::kDispatch, [&] {
    check_dispatch_area(area_, ctx_.geometry, record, op);
    return route_for_dispatch(args, ctx_.geometry);
  });

  CallHeader header = dispatch_header(args, CallKind::kDispatch);
  header.num_topk = args.num_topk;
  header.has_weights = in.topk_weights.has_value();
  header.num_experts = args.num_experts;
  header.num_expert_counts = static_cast<int32_t>(routing.per_expert.size());
  header.num_worst_tokens = in.num_worst_tokens;
  std::vector<int32_t> counts = routing.per_rank;
  counts.insert(counts.end(), routing.per_expert.begin(), routing.per_expert.end());
  const std::vector<PeerCall> calls = exchange(header, counts, op);
  const uint64_t dispatch_step = ctx_.sync->sequence(kNormalChannel);
  check_same_call(calls, rank, op);
  const std::vector<int32_t> prefix = rank_prefix_matrix(calls);
  check_worst_tokens(calls, prefix, rank);

  const int num_recv = prefix[(R - 1) * R + rank];
  const int rows = in.num_worst_tokens > 0 ? in.num_worst_tokens : num_recv;
  std::shared_ptr<DispatchHandle> handle =
      make_handle(args, routing, calls, prefix, rank, rows, dispatch_step, ctx_.buffer_id, stream);
  if (ctx_.geometry.num_nodes() > 1) add_internode_fields(*handle, prefix, ctx_.geometry, *args.allocator, stream);
  DispatchResult result;
  DispatchReceive receive = allocate_receive(args, record, *handle, rank, result, stream);
  receive.src_idx = handle->recv_src_idx.data_as<int32_t>();
  const DispatchSend send{&in, routing.in_rank.data(), args.num_tokens};
  result.network_bytes_per_node =
      transport_tokens(area_, *ctx_.sync, ctx_.geometry, record, send, receive, handle_state(*handle).num_tokens, op);

  if (in.num_worst_tokens == 0 && !routing.per_expert.empty())
    result.num_recv_tokens_per_expert = recv_tokens_per_expert(calls, rank, args.num_experts / R, in.expert_alignment);
  result.handle = std::move(handle);
  return result;
}

DispatchResult NormalMode::cached_dispatch(const DispatchArgs& args, StreamHandle stream) {
  const char* op = "dispatch";
  const int R = ctx_.geometry.num_ranks, rank = ctx_.geometry.rank;
  const DispatchHandle& handle = *args.inputs->handle;
  const TokenRecord record = token_record(args, R, /*with_topk=*/false);
  before_exchange(CallKind::kCachedDispatch, [&] {
    check_dispatch_area(area_, ctx_.geometry, record, op);
    check_handle_rows(handle, rank, op);
  });

  CallHeader header = dispatch_header(args, CallKind::kCachedDispatch);
  header.handle_step = handle_state(handle).dispatch_step;
  const std::vector<PeerCall> calls = exchange(header, {}, op);
  check_same_call(calls, rank, op);

  DispatchResult result;
  DispatchReceive receive = allocate_receive(args, record, handle, rank, result, stream);
  std::vector<int32_t> src_idx(handle.num_recv_tokens);
  receive.src_idx = src_idx.data();
  const DispatchSend send{args.inputs, handle.is_token_in_rank.data_as<const uint8_t>(), args.num_tokens};
  result.network_bytes_per_node =
      transport_tokens(area_, *ctx_.sync, ctx_.geometry, record, send, receive, handle_state(handle).num_tokens, op);
  return result;
}

CombineResult NormalMode::combine(const CombineArgs& args, StreamHandle stream) {
  const char* op = "combine";
  const int R = ctx_.geometry.num_ranks, rank = ctx_.geometry.rank;
  const CombineInputs& in = *args.inputs;
  const DispatchHandle& handle = *in.handle;
  const GroupGeometry& g = ctx_.geometry;
  before_exchange(CallKind::kCombine, [&] {
    if (g.num_nodes() == 1)
      check_area_fits(area_, combine_min_bytes(R, args.hidden, args.num_topk), op, "one combined token");
    else
      check_area_fits(area_, internode_combine_min_bytes(R, g.num_nodes(), args.hidden, args.num_topk), op,
                      "one combined token, with one partial per other node");
    check_handle_rows(handle, rank, op);
    check_handle_sources(handle, rank, op);
  });

  CallHeader header;
  header.kind = CallKind::kCombine;
  header.num_tokens = args.num_tokens;
  header.hidden = args.hidden;
  header.x_dtype = static_cast<int32_t>(in.x.dtype);
  header.num_topk = args.num_topk;
  header.handle_step = handle_state(handle).dispatch_step;
  const std::vector<PeerCall> calls = exchange(header, {}, op);
  check_same_call(calls, rank, op);

  CombineResult result;
  result.combined_x =
      allocate(*args.allocator, DType::kBFloat16, {args.num_tokens, args.hidden}, Device::cpu(), stream);
  CombineWork work;
  work.handle = &handle;
  work.x = in.x.data_as<const uint16_t>();
  work.hidden = args.hidden;
  work.num_topk = args.num_topk;
  work.combined_x = result.combined_x.data_as<uint16_t>();
  if (in.topk_weights) {
    result.combined_topk_weights =
        allocate(*args.allocator, DType::kFloat32, {args.num_tokens, args.num_topk}, Device::cpu(), stream);
    work.topk_weights = in.topk_weights->data_as<const float>();
    work.combined_weights = result.combined_topk_weights->data_as<float>();
  }
  if (in.bias_0) work.bias[0] = in.bias_0->data_as<const uint16_t>();
  if (in.bias_1) work.bias[1] = in.bias_1->data_as<const uint16_t>();
  if (g.num_nodes() > 1)
    result.network_bytes_per_node = combine_rows_across_nodes(area_, *ctx_.sync, g, work, op);
  else
    combine_rows(area_, *ctx_.sync, rank, work, op);
  return result;
}

}  // namespace epcomm::cpu
