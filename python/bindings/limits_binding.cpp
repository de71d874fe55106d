// epcomm._C.backend_limits / Buffer.limits: epcomm::Limits as a dict (epcomm/limits.hpp), dtypes by
// their torch names; and the conversion of Python's timeout_s.
#include <pybind11/pybind11.h>

#include <cmath>

#include "bindings.hpp"
#include "epcomm/buffer.hpp"
#include "epcomm/limits.hpp"

namespace epcomm::python {

namespace py = pybind11;

namespace {

py::list dtype_names(const std::vector<DType>& dtypes) {
  py::list names;
  for (DType d : dtypes) names.append(to_string(d));
  return names;
}

}  // namespace

py::dict limits_to_dict(const Limits& l) {
  py::dict d;
  d["backend"] = to_string(l.backend);
  d["available"] = l.available;
  d["normal_mode"] = l.normal_mode;
  d["low_latency_mode"] = l.low_latency_mode;
  d["normal_inter_node"] = l.normal_inter_node;
  d["low_latency_inter_node"] = l.low_latency_inter_node;
  d["max_ranks"] = l.max_ranks;
  d["max_ranks_per_node"] = l.max_ranks_per_node;
  d["max_topk"] = l.max_topk;
  d["row_alignment_bytes"] = l.row_alignment_bytes;
  d["data_alignment_bytes"] = l.data_alignment_bytes;
  d["max_num_sms"] = l.max_num_sms;
  d["max_local_experts"] = l.max_local_experts;
  d["x_dtypes"] = dtype_names(l.x_dtypes);
  d["scale_dtypes"] = dtype_names(l.scale_dtypes);
  d["max_low_latency_topk"] = l.max_low_latency_topk;
  d["low_latency_hidden_multiple"] = l.low_latency_hidden_multiple;
  d["max_low_latency_tokens_per_rank"] = l.max_low_latency_tokens_per_rank;
  d["max_low_latency_experts"] = l.max_low_latency_experts;
  d["use_logfmt"] = l.use_logfmt;
  return d;
}

// timeout_s of Buffer(): 0 = the default ($EPCOMM_TIMEOUT_S, else 100 s); a negative, nan or
// infinite value is an error (never the default in disguise); a positive one is at least 1 ms.
std::chrono::milliseconds timeout_from_seconds(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0)
    throw Error(ErrorCode::kInvalidArgument,
                "Buffer: timeout_s: expected a finite number of seconds >= 0 (0 or None = $EPCOMM_TIMEOUT_S, else "
                "100 s), got " +
                    py::repr(py::float_(seconds)).cast<std::string>());
  if (seconds == 0) return std::chrono::milliseconds(0);
  // Beyond int64 milliseconds the C++ side rejects it by its own cap (core/timeout.hpp).
  const double milliseconds = std::min(std::ceil(seconds * 1000.0), 9.0e18);
  return std::chrono::milliseconds(static_cast<int64_t>(milliseconds));
}

void bind_limits(py::module_& m) {
  m.def(
      "backend_limits",
      [](const std::string& name) {
        if (name == "cpu") return limits_to_dict(backend_limits(BackendKind::kCpu));
        if (name == "cuda") return limits_to_dict(backend_limits(BackendKind::kCuda));
        throw Error(ErrorCode::kInvalidArgument,
                    "backend_limits: backend: expected 'cpu' or 'cuda', got '" + name + "'");
      },
      py::arg("backend"));
}

}  // namespace epcomm::python
