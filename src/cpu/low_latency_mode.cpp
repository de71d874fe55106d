// Low-latency mode of the CPU reference backend: call numbering, receive hooks, clean and the mask.
// The protocol is described in low_latency_exchange.hpp, the two operations in
// low_latency_dispatch.cpp and low_latency_combine.cpp.
#include "cpu/low_latency_mode.hpp"

#include <cstring>

#include "core/check.hpp"
#include "cpu/low_latency_combine.hpp"
#include "cpu/low_latency_dispatch.hpp"
#include "cpu/low_latency_exchange.hpp"

namespace epcomm::cpu {

// What a receive hook needs; hooks hold it weakly and find it gone once the Buffer is destroyed.
struct LowLatencyCore {
  GroupGeometry geometry;
  LowLatencyExchange exchange;
  uint64_t last_call_id = 0;  // counted by send halves, so the same on every rank for the same call
  uint64_t epoch = 0;         // bumped by clean: calls sent before it can no longer receive
  // The zero-copy region (get_next_low_latency_combine_buffer): read by this rank only, so it lives
  // in private memory, not in num_rdma_bytes (LowLatencyLayout::zero_copy_bytes). Grown on demand.
  std::vector<std::byte> zero_copy;

  LowLatencyCore(const CpuContext& ctx, Area area) : geometry(ctx.geometry), exchange(ctx, area) {}
};

struct LowLatencyMode::State {
  std::shared_ptr<LowLatencyCore> core;
};

namespace {

// Runs the receive half of `call` (sent in `epoch`) at most once. A failure inside it marks the
// Buffer failed here, since a hook runs outside the front (Buffer) that would otherwise do it.
template <class Call>
void receive(LowLatencyCore* core, Call& call, uint64_t epoch, const char* op) {
  if (core == nullptr) throw_error(ErrorCode::kInvalidArgument, concat(op, ": recv hook: the Buffer was destroyed"));
  // A hook runs outside the front, which refuses every call of a failed Buffer: refuse here too. A
  // failed rank must never arrive at a step again (GroupSync::barrier relies on it), else its peers
  // would pair this call with whatever step they are at.
  const std::string failure = core->exchange.failure();
  if (!failure.empty())
    throw_error(ErrorCode::kBufferFailed,
                concat(op, ": recv hook: the Buffer failed in an earlier call and can only be ",
                       "destroyed (a new Buffer then works); first cause: ", failure));
  require(epoch == core->epoch, op, "recv hook",
          "clean_low_latency_buffer ran after this call was sent: its receive half can no longer run");
  require(!call.started.exchange(true), op, "recv hook", "the receive half already ran (a hook runs once)");
  try {
    call.receive(core->exchange);
  } catch (const Error& error) {
    const ErrorCode code = error.code();
    if (code == ErrorCode::kTimeout || code == ErrorCode::kPeerFailure || code == ErrorCode::kInternal)
      core->exchange.mark_failed(concat("rank ", core->geometry.rank, " in ", op, ": ", error.what()));
    throw;
  }
}

// The four steps of a call whose header is `header` and that moves nothing (clean, a rejection).
// Returns what find_disagreement found.
Disagreement exchange_header_only(LowLatencyExchange& exchange, const CallHeader& header, const char* op,
                                  std::string_view rejection = {}) {
  exchange.publish_header(header, rejection);
  exchange.sync(op);
  Disagreement disagreement = exchange.find_disagreement(header);
  exchange.sync(op);
  return disagreement;
}

CallKind call_kind_of(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kLowLatencyDispatch:
      return CallKind::kDispatch;
    case CollectiveKind::kLowLatencyCombine:
      return CallKind::kCombine;
    default:
      return CallKind::kClean;
  }
}

// Builds a call's send half; an input error it finds is rejected in the call's exchange first.
template <class Make>
auto send_half(LowLatencyMode& mode, CollectiveKind kind, Make&& make) {
  try {
    return make();
  } catch (const Error& error) {
    mode.reject(kind, error);
    throw;
  }
}

template <class Call>
RecvHook make_hook(const std::shared_ptr<LowLatencyCore>& core, std::shared_ptr<Call> call, const char* op) {
  return RecvHook([weak = std::weak_ptr<LowLatencyCore>(core), call, epoch = core->epoch, op](StreamHandle) {
    receive(weak.lock().get(), *call, epoch, op);
  });
}

}  // namespace

LowLatencyMode::LowLatencyMode(const CpuContext& ctx, Area area) : state_(std::make_unique<State>()) {
  state_->core = std::make_shared<LowLatencyCore>(ctx, area);
}

LowLatencyMode::~LowLatencyMode() = default;

LowLatencyDispatchResult LowLatencyMode::dispatch(const LowLatencyDispatchArgs& args,
                                                  const LowLatencyOptions& options) {
  const char* op = "low_latency_dispatch";
  LowLatencyCore& core = *state_->core;
  // The call id is taken once the send half succeeded; a rejected send half takes it in reject().
  auto call = send_half(*this, CollectiveKind::kLowLatencyDispatch, [&] {
    return std::make_shared<LowLatencyDispatchCall>(args, options, core.last_call_id + 1, core.geometry);
  });
  ++core.last_call_id;
  LowLatencyDispatchResult result = call->result();
  if (options.return_recv_hook) {
    result.hook = make_hook(state_->core, call, op);
  } else {
    receive(&core, *call, core.epoch, op);
  }
  return result;
}

LowLatencyCombineResult LowLatencyMode::combine(const LowLatencyCombineArgs& args, const LowLatencyOptions& options) {
  const char* op = "low_latency_combine";
  LowLatencyCore& core = *state_->core;
  auto call = send_half(*this, CollectiveKind::kLowLatencyCombine, [&] {
    const std::byte* zero_copy_x = nullptr;
    if (args.inputs->zero_copy) {
      const Regions regions = core.exchange.regions(args.max_tokens_per_rank, args.hidden, args.num_experts, op);
      require(int64_t(core.zero_copy.size()) >= regions.zero_copy_bytes(), op, "zero_copy",
              "is True but get_next_low_latency_combine_buffer(handle) was not called for a dispatch of this shape");
      zero_copy_x = core.zero_copy.data();
    }
    return std::make_shared<LowLatencyCombineCall>(args, options, core.last_call_id + 1, core.geometry, zero_copy_x);
  });
  ++core.last_call_id;
  LowLatencyCombineResult result = call->result();
  if (options.return_recv_hook) {
    result.hook = make_hook(state_->core, call, op);
  } else {
    receive(&core, *call, core.epoch, op);
  }
  return result;
}

// The zero-copy region is written by the user only; a combine's send half copies the valid rows out
// of it, so the next combine's data may be written as soon as the previous combine call returned.
TensorView LowLatencyMode::next_combine_buffer(const LowLatencyHandle& handle) {
  LowLatencyCore& core = *state_->core;
  const Regions regions = core.exchange.regions(handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                                                handle.num_experts, "get_next_low_latency_combine_buffer");
  const int64_t rows = int64_t(core.geometry.num_ranks) * handle.num_max_dispatch_tokens_per_rank;
  if (int64_t(core.zero_copy.size()) < regions.zero_copy_bytes()) core.zero_copy.resize(regions.zero_copy_bytes());
  return TensorView::contiguous(core.zero_copy.data(), DType::kBFloat16,
                                {int64_t(regions.num_local_experts), rows, int64_t(handle.hidden)}, Device::cpu());
}

// Collective. Its header carries the sizes, so ranks cleaning different sizes all raise. After the
// first sync no rank is inside a receive half, after the second none reads our area until our next
// call; the headers (call ids) and the combine tags are the only shared data that outlive a call,
// so they are what is reset. Calls sent before (hooks not yet run) are cancelled.
void LowLatencyMode::clean(int max_tokens_per_rank, int hidden, int num_experts) {
  const char* op = "clean_low_latency_buffer";
  LowLatencyCore& core = *state_->core;
  LowLatencyExchange& exchange = core.exchange;
  const Regions regions = send_half(*this, CollectiveKind::kCleanLowLatency,
                                    [&] { return exchange.regions(max_tokens_per_rank, hidden, num_experts, op); });
  CallHeader header;
  header.call_id = ++core.last_call_id;
  header.kind = CallKind::kClean;
  header.max_tokens_per_rank = max_tokens_per_rank;
  header.hidden = hidden;
  header.num_experts = num_experts;
  const Disagreement disagreement = exchange_header_only(exchange, header, op);
  if (!disagreement.empty()) throw_error(disagreement.code, concat(op, ": ", disagreement.text));
  std::byte* area = exchange.area_of(core.geometry.rank);
  std::memset(area + regions.header, 0, sizeof(CallHeader));
  std::memset(area + regions.combine_tags, 0, regions.num_combine_slots() * sizeof(uint64_t));
  ++core.epoch;
}

void LowLatencyMode::reject(CollectiveKind kind, const Error& error) {
  LowLatencyCore& core = *state_->core;
  const char* op = to_string(kind);
  CallHeader header;
  header.call_id = ++core.last_call_id;
  header.kind = call_kind_of(kind);
  header.rejected = static_cast<int32_t>(error.code());
  const Disagreement disagreement = exchange_header_only(core.exchange, header, op, rejection_text(error));
  if (!disagreement.empty()) throw_error(disagreement.code, concat(op, ": ", disagreement.text));
}

// The mask is this rank's own (like DeepEP's mask buffer): updating it is not collective.
void LowLatencyMode::update_mask(int rank, bool mask) { state_->core->exchange.set_masked(rank, mask); }

TensorView LowLatencyMode::query_mask() { return state_->core->exchange.mask_view(); }

void LowLatencyMode::clean_mask() { state_->core->exchange.clear_mask(); }

}  // namespace epcomm::cpu
