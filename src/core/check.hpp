// Argument checks shared by every layer. Each failure throws epcomm::Error whose message reads
// "<operation>: <argument>: expected <what>, got <value>" so that a user sees what to fix.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <sstream>
#include <string>

#include "epcomm/error.hpp"
#include "epcomm/tensor.hpp"

namespace epcomm {

// Builds a message from any streamable pieces: concat("T = ", 5) == "T = 5".
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

[[noreturn]] void throw_error(ErrorCode code, const std::string& message);

// Throws kInvalidArgument "<op>: <arg>: <message parts...>" unless `condition` holds. The message is
// built only on failure: checks sit on every call's path.
template <class... Parts>
inline void require(bool condition, const char* op, const char* arg, const Parts&... message) {
  if (!condition) [[unlikely]]
    throw_error(ErrorCode::kInvalidArgument, concat(op, ": ", arg, ": ", message...));
}

// Tensor checks. `dims_doc` names the expected dimensions, e.g. "[T, hidden]".
// An entry of -1 in `shape` accepts any size in that dimension.
void check_shape(const TensorView& t, const char* op, const char* arg, std::initializer_list<int64_t> shape,
                 const char* dims_doc);
void check_dtype(const TensorView& t, const char* op, const char* arg, std::span<const DType> allowed);
inline void check_dtype(const TensorView& t, const char* op, const char* arg, std::initializer_list<DType> allowed) {
  check_dtype(t, op, arg, std::span<const DType>(allowed.begin(), allowed.size()));
}
void check_device(const TensorView& t, const char* op, const char* arg, const Device& expected);
void check_contiguous(const TensorView& t, const char* op, const char* arg);
// The usual trio for an input the kernels read densely.
inline void check_tensor(const TensorView& t, const char* op, const char* arg, std::initializer_list<int64_t> shape,
                         const char* dims_doc, std::initializer_list<DType> allowed, const Device& device) {
  check_shape(t, op, arg, shape, dims_doc);
  check_dtype(t, op, arg, allowed);
  check_device(t, op, arg, device);
}

}  // namespace epcomm
