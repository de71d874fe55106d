#include "epcomm/error.hpp"

#include "epcomm/version.hpp"

namespace epcomm {

const char* to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return "invalid argument";
    case ErrorCode::kTimeout:
      return "timeout";
    case ErrorCode::kPeerFailure:
      return "peer failure";
    case ErrorCode::kOutOfCapacity:
      return "out of capacity";
    case ErrorCode::kUnsupported:
      return "not supported";
    case ErrorCode::kInternal:
      return "internal error";
    case ErrorCode::kBufferFailed:
      return "buffer failed";
  }
  return "unknown error";
}

Error::Error(ErrorCode code, const std::string& message)
    : std::runtime_error("epcomm: " + std::string(to_string(code)) + ": " + message), code_(code) {}

const char* version() { return "0.1.0"; }

}  // namespace epcomm
