#include "core/check.hpp"

namespace epcomm {

void throw_error(ErrorCode code, const std::string& message) { throw Error(code, message); }

void check_shape(const TensorView& t, const char* op, const char* arg, std::initializer_list<int64_t> shape,
                 const char* dims_doc) {
  const int expected_ndim = static_cast<int>(shape.size());
  if (t.ndim != expected_ndim)
    require(false, op, arg, "expected ", expected_ndim, " dims ", dims_doc, ", got ", t.ndim, " (", t.shape_string(),
            ")");
  int dim = 0;
  for (int64_t expected : shape) {
    if (expected >= 0 && t.shape[dim] != expected)
      require(false, op, arg, "expected shape ", dims_doc, " with dim ", dim, " = ", expected, ", got ",
              t.shape_string());
    ++dim;
  }
}

void check_dtype(const TensorView& t, const char* op, const char* arg, std::span<const DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::string names;
  for (DType d : allowed) names += (names.empty() ? "" : " or ") + std::string(to_string(d));
  require(false, op, arg, "expected dtype ", names, ", got ", to_string(t.dtype));
}

void check_device(const TensorView& t, const char* op, const char* arg, const Device& expected) {
  if (!(t.device == expected))
    require(false, op, arg, "expected a tensor on ", to_string(expected), ", got one on ", to_string(t.device));
}

void check_contiguous(const TensorView& t, const char* op, const char* arg) {
  if (!t.is_contiguous())
    require(false, op, arg, "expected a contiguous tensor, got shape ", t.shape_string(),
            " with non-row-major strides");
}

}  // namespace epcomm
