// epcomm._C.Buffer: the C++ Buffer seen from Python. Arguments arrive by keyword, already in
// epcomm's terms (tensor description tuples, stream handles as ints, configs as dicts of their field
// names) from epcomm/buffer.py, which owns the DeepEP-compatible surface and builds DeepEP's tuples;
// results go back as dicts of torch tensors keyed by name (the names of epcomm/_C.pyi).
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "bindings.hpp"
#include "bootstrap_bridge.hpp"
#include "epcomm/buffer.hpp"
#include "python_objects.hpp"
#include "tensor_bridge.hpp"

namespace epcomm::python {
namespace {

namespace py = pybind11;

// The Buffer and the bootstrap it was built over (kept alive for the collective destroy()).
struct PyBuffer {
  std::unique_ptr<PyBootstrap> bootstrap;
  std::unique_ptr<Buffer> buffer;
  // Bytes the last dispatch / combine put on the emulated network per destination node (N > 1, CPU).
  std::vector<int64_t> last_network_bytes;

  // After destroy() the C++ Buffer stays and answers every call with "<op>: the Buffer was destroyed".
  Buffer& get() { return *buffer; }
};

// A dispatch handle as a Python object (element -1 of the Python handle tuple).
struct PyDispatchHandle {
  std::shared_ptr<const DispatchHandle> handle;
};

const DispatchHandle* handle_from(const py::handle& object) {
  if (object.is_none()) return nullptr;
  if (!py::isinstance<PyDispatchHandle>(object))
    throw Error(ErrorCode::kInvalidArgument, "handle: expected the handle tuple returned by dispatch");
  return object.cast<const PyDispatchHandle&>().handle.get();
}

// A Config crosses as a dict of its five field names (epcomm/config.py Config._as_dict).
std::optional<Config> config_from(const py::handle& object) {
  if (object.is_none()) return std::nullopt;
  if (!py::isinstance<py::dict>(object))
    throw Error(ErrorCode::kInvalidArgument, "config: expected a dict of the Config fields");
  const auto fields = object.cast<py::dict>();
  auto field = [&](const char* name) {
    if (!fields.contains(name)) throw Error(ErrorCode::kInvalidArgument, std::string("config: missing field ") + name);
    return fields[name].cast<int>();
  };
  return Config{field("num_sms"), field("num_max_nvl_chunked_send_tokens"), field("num_max_nvl_chunked_recv_tokens"),
                field("num_max_rdma_chunked_send_tokens"), field("num_max_rdma_chunked_recv_tokens")};
}

py::dict config_to_dict(const Config& c) {
  py::dict d;
  d["num_sms"] = c.num_sms;
  d["num_max_nvl_chunked_send_tokens"] = c.num_max_nvl_chunked_send_tokens;
  d["num_max_nvl_chunked_recv_tokens"] = c.num_max_nvl_chunked_recv_tokens;
  d["num_max_rdma_chunked_send_tokens"] = c.num_max_rdma_chunked_send_tokens;
  d["num_max_rdma_chunked_recv_tokens"] = c.num_max_rdma_chunked_recv_tokens;
  return d;
}

// The per-call stream arguments of normal mode, and the allocator they imply.
struct CallStream {
  PyAllocator allocator;
  StreamOptions options;

  CallStream(uintptr_t stream, const py::object& previous_event, bool async_finish, bool allocate_on_comm_stream,
             py::object allocate)
      : allocator(std::move(allocate)) {
    options.stream = stream_from_int(stream);
    options.previous_event = previous_event.is_none() ? nullptr : &previous_event.cast<const Event&>();
    options.async_finish = async_finish;
    options.allocate_on_comm_stream = allocate_on_comm_stream;
    options.allocator = &allocator;
  }
};

LowLatencyOptions low_latency_options(uintptr_t stream, bool async_finish, bool return_recv_hook,
                                      Allocator* allocator) {
  LowLatencyOptions options;
  options.stream = stream_from_int(stream);
  options.async_finish = async_finish;
  options.return_recv_hook = return_recv_hook;
  options.allocator = allocator;
  return options;
}

BackendKind backend_from(const std::string& name) {
  if (name == "cpu") return BackendKind::kCpu;
  if (name == "cuda") return BackendKind::kCuda;
  throw Error(ErrorCode::kInvalidArgument, "Buffer: backend: expected 'cpu' or 'cuda', got '" + name + "'");
}

// Results cross as dicts keyed by the names epcomm/buffer.py (and _C.pyi) use.
template <typename... Items>
py::dict named(Items&&... items) {
  py::dict d;
  ((d[items.first] = std::move(items.second)), ...);
  return d;
}

std::pair<const char*, py::object> item(const char* name, py::object value) { return {name, std::move(value)}; }

py::object hook_or_none(RecvHook hook) {
  if (!hook) return py::none();
  return py::cast(std::move(hook));
}

// The calls a front end may reject (Buffer.reject_inputs), by the names of epcomm/_C.pyi.
CollectiveKind collective_kind_from(const std::string& name) {
  static const std::pair<const char*, CollectiveKind> kKinds[] = {
      {"dispatch", CollectiveKind::kDispatch},
      {"cached_dispatch", CollectiveKind::kCachedDispatch},
      {"combine", CollectiveKind::kCombine},
      {"low_latency_dispatch", CollectiveKind::kLowLatencyDispatch},
      {"low_latency_combine", CollectiveKind::kLowLatencyCombine},
      {"clean_low_latency_buffer", CollectiveKind::kCleanLowLatency}};
  for (const auto& [known, kind] : kKinds)
    if (name == known) return kind;
  throw Error(ErrorCode::kInvalidArgument,
              "reject_inputs: kind: expected a collective call's name, got '" + name + "'");
}

// An input error's code by its name (to_string(ErrorCode)); the only codes a rejection carries.
ErrorCode input_error_code_from(const std::string& name) {
  for (ErrorCode code : {ErrorCode::kInvalidArgument, ErrorCode::kUnsupported, ErrorCode::kOutOfCapacity})
    if (name == to_string(code)) return code;
  throw Error(ErrorCode::kInvalidArgument, "reject_inputs: code: expected an input error's code, got '" + name + "'");
}

void reject_inputs(Buffer& buffer, CollectiveKind kind, const Error& error) {
  py::gil_scoped_release release;  // the rejection meets the peers in the call's exchange
  buffer.reject_inputs(kind, error);
}

// Runs the conversion of a collective call's Python arguments; a failure there is rejected like any
// input error of the call (Buffer::reject_inputs), so that the peers raise at this call too, then
// rethrown as it was.
template <class Convert>
void converted(Buffer& buffer, CollectiveKind kind, Convert&& convert) {
  try {
    convert();
  } catch (const Error& error) {
    reject_inputs(buffer, kind, error);
    throw;
  } catch (const std::exception& error) {  // pybind11's cast of a Python object of the wrong type
    reject_inputs(buffer, kind, Error(ErrorCode::kInvalidArgument, error.what()));
    throw;
  }
}

std::unique_ptr<PyBuffer> make_buffer(int rank, int size, py::object all_gather, py::object barrier,
                                      const std::string& backend, int64_t num_nvl_bytes, int64_t num_rdma_bytes,
                                      bool low_latency_mode, int ranks_per_node, int device, double timeout_s,
                                      bool allow_nvlink_for_low_latency_mode, bool enable_shrink,
                                      uintptr_t comm_stream) {
  BufferOptions options;
  options.backend = backend_from(backend);
  options.num_nvl_bytes = num_nvl_bytes;
  options.num_rdma_bytes = num_rdma_bytes;
  options.low_latency_mode = low_latency_mode;
  options.ranks_per_node = ranks_per_node;
  options.device = device;
  options.timeout = timeout_from_seconds(timeout_s);
  options.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode;
  options.enable_shrink = enable_shrink;
  options.comm_stream = reinterpret_cast<StreamHandle>(comm_stream);
  auto result = std::make_unique<PyBuffer>();
  result->bootstrap = std::make_unique<PyBootstrap>(rank, size, std::move(all_gather), std::move(barrier));
  py::gil_scoped_release release;
  result->buffer = std::make_unique<Buffer>(*result->bootstrap, options);
  return result;
}

py::dict get_dispatch_layout(py::object self, const py::handle& topk_idx, int num_experts, uintptr_t stream,
                             const py::object& previous_event, bool async_finish, bool allocate_on_comm_stream,
                             py::object allocate) {
  Buffer& buffer = self.cast<PyBuffer&>().get();
  const TensorView topk = view_from_python(topk_idx, "get_dispatch_layout: topk_idx");
  CallStream call(stream, previous_event, async_finish, allocate_on_comm_stream, std::move(allocate));
  LayoutResult r;
  {
    py::gil_scoped_release release;
    r = buffer.get_dispatch_layout(topk, num_experts, call.options);
  }
  return named(item("num_tokens_per_rank", to_torch(r.num_tokens_per_rank, self)),
               item("num_tokens_per_rdma_rank", to_torch_optional(r.num_tokens_per_rdma_rank, self)),
               item("num_tokens_per_expert", to_torch(r.num_tokens_per_expert, self)),
               item("is_token_in_rank", to_torch(r.is_token_in_rank, self)), item("event", py::cast(r.event)));
}

py::dict dispatch(py::object self, const py::handle& x, const py::handle& x_scales, const py::handle& topk_idx,
                  const py::handle& topk_weights, const py::handle& num_tokens_per_rank,
                  const py::handle& num_tokens_per_rdma_rank, const py::handle& is_token_in_rank,
                  const py::handle& num_tokens_per_expert, const py::handle& handle, int expert_alignment,
                  int num_worst_tokens, const py::handle& config, uintptr_t stream, const py::object& previous_event,
                  bool async_finish, bool allocate_on_comm_stream, py::object allocate) {
  Buffer& buffer = self.cast<PyBuffer&>().get();
  DispatchInputs in;
  std::optional<CallStream> call;
  converted(buffer, handle.is_none() ? CollectiveKind::kDispatch : CollectiveKind::kCachedDispatch, [&] {
    in.x = view_from_python(x, "dispatch: x");
    in.x_scales = optional_view(x_scales, "dispatch: x_scales");
    in.topk_idx = optional_view(topk_idx, "dispatch: topk_idx");
    in.topk_weights = optional_view(topk_weights, "dispatch: topk_weights");
    in.num_tokens_per_rank = optional_view(num_tokens_per_rank, "dispatch: num_tokens_per_rank");
    in.num_tokens_per_rdma_rank = optional_view(num_tokens_per_rdma_rank, "dispatch: num_tokens_per_rdma_rank");
    in.is_token_in_rank = optional_view(is_token_in_rank, "dispatch: is_token_in_rank");
    in.num_tokens_per_expert = optional_view(num_tokens_per_expert, "dispatch: num_tokens_per_expert");
    in.handle = handle_from(handle);
    in.expert_alignment = expert_alignment;
    in.num_worst_tokens = num_worst_tokens;
    in.config = config_from(config);
    call.emplace(stream, previous_event, async_finish, allocate_on_comm_stream, std::move(allocate));
  });
  DispatchResult r;
  {
    py::gil_scoped_release release;
    r = buffer.dispatch(in, call->options);
  }
  self.cast<PyBuffer&>().last_network_bytes = r.network_bytes_per_node;
  // `handle`: the tensors of a new handle by name, and the opaque C++ handle as "native" (None for a
  // cached dispatch, which makes no new handle).
  py::object new_handle = py::none();
  if (r.handle) {
    new_handle = named(item("rank_prefix_matrix", to_torch(r.handle->rank_prefix_matrix, self)),
                       item("is_token_in_rank", to_torch(r.handle->is_token_in_rank, self)),
                       item("send_row", to_torch(r.handle->send_row, self)),
                       item("recv_src_idx", to_torch(r.handle->recv_src_idx, self)),
                       item("recv_gbl_rank_prefix_sum", to_torch_optional(r.handle->recv_gbl_rank_prefix_sum, self)),
                       item("recv_rdma_rank_prefix_sum", to_torch_optional(r.handle->recv_rdma_rank_prefix_sum, self)),
                       item("native", py::cast(PyDispatchHandle{r.handle})));
  }
  py::object counts = py::none();
  if (!in.handle) counts = py::cast(r.num_recv_tokens_per_expert);
  return named(item("recv_x", to_torch(r.recv_x, self)),
               item("recv_x_scales", to_torch_optional(r.recv_x_scales, self)),
               item("recv_topk_idx", to_torch_optional(r.recv_topk_idx, self)),
               item("recv_topk_weights", to_torch_optional(r.recv_topk_weights, self)),
               item("num_recv_tokens_per_expert_list", std::move(counts)), item("handle", std::move(new_handle)),
               item("event", py::cast(r.event)));
}

py::dict combine(py::object self, const py::handle& x, const py::handle& handle, const py::handle& topk_weights,
                 const py::handle& bias_0, const py::handle& bias_1, const py::handle& config, uintptr_t stream,
                 const py::object& previous_event, bool async_finish, bool allocate_on_comm_stream,
                 py::object allocate) {
  Buffer& buffer = self.cast<PyBuffer&>().get();
  CombineInputs in;
  std::optional<CallStream> call;
  converted(buffer, CollectiveKind::kCombine, [&] {
    in.x = view_from_python(x, "combine: x");
    in.handle = handle_from(handle);
    in.topk_weights = optional_view(topk_weights, "combine: topk_weights");
    in.bias_0 = optional_view(bias_0, "combine: bias[0]");
    in.bias_1 = optional_view(bias_1, "combine: bias[1]");
    in.config = config_from(config);
    call.emplace(stream, previous_event, async_finish, allocate_on_comm_stream, std::move(allocate));
  });
  CombineResult r;
  {
    py::gil_scoped_release release;
    r = buffer.combine(in, call->options);
  }
  self.cast<PyBuffer&>().last_network_bytes = r.network_bytes_per_node;
  return named(item("combined_x", to_torch(r.combined_x, self)),
               item("combined_topk_weights", to_torch_optional(r.combined_topk_weights, self)),
               item("event", py::cast(r.event)));
}

py::dict low_latency_dispatch(py::object self, const py::handle& x, const py::handle& topk_idx,
                              int num_max_dispatch_tokens_per_rank, int num_experts,
                              const py::handle& cumulative_local_expert_recv_stats,
                              const py::handle& dispatch_wait_recv_cost_stats, bool use_fp8, bool round_scale,
                              bool use_ue8m0, uintptr_t stream, bool async_finish, bool return_recv_hook,
                              py::object allocate) {
  Buffer& buffer = self.cast<PyBuffer&>().get();
  LowLatencyDispatchInputs in;
  converted(buffer, CollectiveKind::kLowLatencyDispatch, [&] {
    in.x = view_from_python(x, "low_latency_dispatch: x");
    in.topk_idx = view_from_python(topk_idx, "low_latency_dispatch: topk_idx");
    in.cumulative_local_expert_recv_stats =
        optional_view(cumulative_local_expert_recv_stats, "low_latency_dispatch: cumulative_local_expert_recv_stats");
    in.dispatch_wait_recv_cost_stats =
        optional_view(dispatch_wait_recv_cost_stats, "low_latency_dispatch: dispatch_wait_recv_cost_stats");
  });
  in.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank;
  in.num_experts = num_experts;
  in.use_fp8 = use_fp8;
  in.round_scale = round_scale;
  in.use_ue8m0 = use_ue8m0;
  PyAllocator allocator(std::move(allocate));
  const LowLatencyOptions options = low_latency_options(stream, async_finish, return_recv_hook, &allocator);
  LowLatencyDispatchResult r;
  {
    py::gil_scoped_release release;
    r = buffer.low_latency_dispatch(in, options);
  }
  return named(item("recv_x", to_torch(r.recv_x, self)),
               item("recv_x_scales", to_torch_optional(r.recv_x_scales, self)),
               item("recv_count", to_torch(r.recv_count, self)), item("src_info", to_torch(r.handle.src_info, self)),
               item("layout_range", to_torch(r.handle.layout_range, self)), item("event", py::cast(r.event)),
               item("hook", hook_or_none(std::move(r.hook))));
}

LowLatencyHandle low_latency_handle(const py::handle& src_info, const py::handle& layout_range,
                                    int num_max_dispatch_tokens_per_rank, int hidden, int num_experts, const char* op) {
  LowLatencyHandle h;
  h.src_info = Tensor::borrowed(view_from_python(src_info, (std::string(op) + ": handle[0] (src_info)").c_str()));
  h.layout_range =
      Tensor::borrowed(view_from_python(layout_range, (std::string(op) + ": handle[1] (layout_range)").c_str()));
  h.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank;
  h.hidden = hidden;
  h.num_experts = num_experts;
  return h;
}

py::dict low_latency_combine(py::object self, const py::handle& x, const py::handle& topk_idx,
                             const py::handle& topk_weights, const py::handle& src_info, const py::handle& layout_range,
                             int num_max_dispatch_tokens_per_rank, int hidden, int num_experts, bool use_logfmt,
                             bool zero_copy, const py::handle& out, const py::handle& combine_wait_recv_cost_stats,
                             uintptr_t stream, bool async_finish, bool return_recv_hook, py::object allocate) {
  Buffer& buffer = self.cast<PyBuffer&>().get();
  LowLatencyHandle h;
  LowLatencyCombineInputs in;
  converted(buffer, CollectiveKind::kLowLatencyCombine, [&] {
    h = low_latency_handle(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts,
                           "low_latency_combine");
    in.x = view_from_python(x, "low_latency_combine: x");
    in.topk_idx = view_from_python(topk_idx, "low_latency_combine: topk_idx");
    in.topk_weights = view_from_python(topk_weights, "low_latency_combine: topk_weights");
    in.out = optional_view(out, "low_latency_combine: out");
    in.combine_wait_recv_cost_stats =
        optional_view(combine_wait_recv_cost_stats, "low_latency_combine: combine_wait_recv_cost_stats");
  });
  in.handle = &h;
  in.use_logfmt = use_logfmt;
  in.zero_copy = zero_copy;
  PyAllocator allocator(std::move(allocate));
  const LowLatencyOptions options = low_latency_options(stream, async_finish, return_recv_hook, &allocator);
  LowLatencyCombineResult r;
  {
    py::gil_scoped_release release;
    r = buffer.low_latency_combine(in, options);
  }
  // With `out`, the result is that tensor; the Python side returns the caller's object for it.
  py::object combined = in.out ? py::none() : to_torch(r.combined_x, self);
  return named(item("combined_x", std::move(combined)), item("event", py::cast(r.event)),
               item("hook", hook_or_none(std::move(r.hook))));
}

py::object next_low_latency_combine_buffer(py::object self, const py::handle& src_info, const py::handle& layout_range,
                                           int num_max_dispatch_tokens_per_rank, int hidden, int num_experts) {
  Buffer& buffer = self.cast<PyBuffer&>().get();
  const LowLatencyHandle h = low_latency_handle(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
                                                num_experts, "get_next_low_latency_combine_buffer");
  const TensorView view = buffer.next_low_latency_combine_buffer(h);
  return to_torch(Tensor::borrowed(view), self);
}

py::object local_buffer_bytes(py::object self, int64_t offset, int64_t num_bytes, bool rdma) {
  Buffer& buffer = self.cast<PyBuffer&>().get();
  const TensorView view = buffer.local_buffer(DType::kBool, offset, num_bytes, rdma);
  return bytes_as_torch(view.data, view.nbytes(), view.device, self);
}

py::object query_mask(py::object self) {
  Buffer& buffer = self.cast<PyBuffer&>().get();
  return to_torch(Tensor::borrowed(buffer.low_latency_query_mask_buffer()), self);
}

void destroy(PyBuffer& self) {
  Buffer& buffer = self.get();
  py::gil_scoped_release release;
  buffer.destroy();
}

}  // namespace

void bind_buffer(py::module_& m) {
  py::class_<PyDispatchHandle>(m, "DispatchHandle",
                               "The routing of one dispatch (opaque; element -1 of the handle tuple).")
      .def_property_readonly("num_ranks", [](const PyDispatchHandle& h) { return h.handle->num_ranks; })
      .def_property_readonly("num_tokens", [](const PyDispatchHandle& h) { return h.handle->num_tokens; })
      .def_property_readonly("num_recv_tokens", [](const PyDispatchHandle& h) { return h.handle->num_recv_tokens; })
      .def_property_readonly("num_topk", [](const PyDispatchHandle& h) { return h.handle->num_topk; })
      .def("__repr__", [](const PyDispatchHandle& h) {
        return "<epcomm DispatchHandle: " + std::to_string(h.handle->num_tokens) + " tokens sent, " +
               std::to_string(h.handle->num_recv_tokens) + " received, " + std::to_string(h.handle->num_ranks) +
               " ranks>";
      });

  py::class_<PyBuffer>(m, "Buffer")
      .def(py::init(&make_buffer), py::arg("rank"), py::arg("size"), py::arg("all_gather"), py::arg("barrier"),
           py::kw_only(), py::arg("backend"), py::arg("num_nvl_bytes"), py::arg("num_rdma_bytes"),
           py::arg("low_latency_mode"), py::arg("ranks_per_node"), py::arg("device"), py::arg("timeout_s"),
           py::arg("allow_nvlink_for_low_latency_mode"), py::arg("enable_shrink"), py::arg("comm_stream") = 0)
      .def_property_readonly("rank", [](PyBuffer& b) { return b.get().rank(); })
      .def_property_readonly("num_ranks", [](PyBuffer& b) { return b.get().num_ranks(); })
      .def_property_readonly("ranks_per_node", [](PyBuffer& b) { return b.get().ranks_per_node(); })
      .def("limits", [](PyBuffer& b) { return limits_to_dict(b.get().limits()); })
      .def_property_readonly("last_network_bytes", [](PyBuffer& b) { return b.last_network_bytes; })
      .def_property_readonly("comm_stream",
                             [](PyBuffer& b) { return reinterpret_cast<uintptr_t>(b.get().comm_stream()); })
      .def("destroy", &destroy)
      .def("check_errors",
           [](PyBuffer& b) {
             py::gil_scoped_release release;
             b.get().check_errors();
           })
      // Every operation takes keyword arguments only (the names of epcomm/_C.pyi) and returns a dict.
      .def("get_dispatch_layout", &get_dispatch_layout, py::kw_only(), py::arg("topk_idx"), py::arg("num_experts"),
           py::arg("stream"), py::arg("previous_event"), py::arg("async_finish"), py::arg("allocate_on_comm_stream"),
           py::arg("allocate"))
      .def("dispatch", &dispatch, py::kw_only(), py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"),
           py::arg("topk_weights"), py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_rdma_rank"),
           py::arg("is_token_in_rank"), py::arg("num_tokens_per_expert"), py::arg("handle"),
           py::arg("expert_alignment"), py::arg("num_worst_tokens"), py::arg("config"), py::arg("stream"),
           py::arg("previous_event"), py::arg("async_finish"), py::arg("allocate_on_comm_stream"), py::arg("allocate"))
      .def("combine", &combine, py::kw_only(), py::arg("x"), py::arg("handle"), py::arg("topk_weights"),
           py::arg("bias_0"), py::arg("bias_1"), py::arg("config"), py::arg("stream"), py::arg("previous_event"),
           py::arg("async_finish"), py::arg("allocate_on_comm_stream"), py::arg("allocate"))
      .def("low_latency_dispatch", &low_latency_dispatch, py::kw_only(), py::arg("x"), py::arg("topk_idx"),
           py::arg("num_max_dispatch_tokens_per_rank"), py::arg("num_experts"),
           py::arg("cumulative_local_expert_recv_stats"), py::arg("dispatch_wait_recv_cost_stats"), py::arg("use_fp8"),
           py::arg("round_scale"), py::arg("use_ue8m0"), py::arg("stream"), py::arg("async_finish"),
           py::arg("return_recv_hook"), py::arg("allocate"))
      .def("low_latency_combine", &low_latency_combine, py::kw_only(), py::arg("x"), py::arg("topk_idx"),
           py::arg("topk_weights"), py::arg("src_info"), py::arg("layout_range"),
           py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_experts"),
           py::arg("use_logfmt"), py::arg("zero_copy"), py::arg("out"), py::arg("combine_wait_recv_cost_stats"),
           py::arg("stream"), py::arg("async_finish"), py::arg("return_recv_hook"), py::arg("allocate"))
      .def("next_low_latency_combine_buffer", &next_low_latency_combine_buffer, py::kw_only(), py::arg("src_info"),
           py::arg("layout_range"), py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"),
           py::arg("num_experts"))
      .def(
          "clean_low_latency_buffer",
          [](PyBuffer& b, int max_tokens, int hidden, int num_experts, uintptr_t stream) {
            Buffer& buffer = b.get();
            py::gil_scoped_release release;
            buffer.clean_low_latency_buffer(max_tokens, hidden, num_experts, stream_from_int(stream));
          },
          py::kw_only(), py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_experts"),
          py::arg("stream"))
      .def(
          "update_mask",
          [](PyBuffer& b, int rank, bool mask, uintptr_t stream) {
            Buffer& buffer = b.get();
            py::gil_scoped_release release;
            buffer.low_latency_update_mask_buffer(rank, mask, stream_from_int(stream));
          },
          py::kw_only(), py::arg("rank"), py::arg("mask"), py::arg("stream"))
      // A front end's own input errors of a collective call (epcomm/buffer.py): told to the peers in
      // that call's exchange, so that every rank raises at the same call (SPEC §5).
      .def(
          "reject_inputs",
          [](PyBuffer& b, const std::string& kind, const std::string& code, const std::string& message) {
            reject_inputs(b.get(), collective_kind_from(kind), Error(input_error_code_from(code), message));
          },
          py::kw_only(), py::arg("kind"), py::arg("code"), py::arg("message"))
      .def("query_mask", &query_mask)
      .def(
          "clean_mask",
          [](PyBuffer& b, uintptr_t stream) {
            Buffer& buffer = b.get();
            py::gil_scoped_release release;
            buffer.low_latency_clean_mask_buffer(stream_from_int(stream));
          },
          py::kw_only(), py::arg("stream"))
      .def("local_buffer_bytes", &local_buffer_bytes, py::kw_only(), py::arg("offset"), py::arg("num_bytes"),
           py::arg("rdma"));

  m.def(
      "default_dispatch_config", [](int num_ranks) { return config_to_dict(default_dispatch_config(num_ranks)); },
      py::arg("num_ranks"));
  m.def(
      "default_combine_config", [](int num_ranks) { return config_to_dict(default_combine_config(num_ranks)); },
      py::arg("num_ranks"));
  m.def(
      "validate_config", [](const py::dict& config) { config_from(config)->validate(); }, py::arg("config"));
  m.def(
      "nvl_buffer_size_hint",
      [](const py::dict& config, int64_t hidden_bytes, int num_ranks) {
        return config_from(config)->nvl_buffer_size_hint(hidden_bytes, num_ranks);
      },
      py::arg("config"), py::arg("hidden_bytes"), py::arg("num_ranks"));
  m.def(
      "rdma_buffer_size_hint",
      [](const py::dict& config, int64_t hidden_bytes, int num_ranks, int ranks_per_node) {
        return config_from(config)->rdma_buffer_size_hint(hidden_bytes, num_ranks, ranks_per_node);
      },
      py::arg("config"), py::arg("hidden_bytes"), py::arg("num_ranks"), py::arg("ranks_per_node"));
}

}  // namespace epcomm::python
