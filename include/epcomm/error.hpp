// epcomm error model: every public call reports failure by throwing epcomm::Error.
//
// The code says what kind of failure it is; the message names the argument, the value, the
// operation and, for timeouts, the peer ranks that did not arrive. A buffer stays usable after an
// kInvalidArgument / kOutOfCapacity / kUnsupported error: every rank of the call raised it (SPEC §5).
// A kTimeout, kPeerFailure or kInternal error inside a collective marks the Buffer failed: every later
// call throws kBufferFailed naming that first cause, and only destroy() still works.
#pragma once

#include <stdexcept>
#include <string>

namespace epcomm {

enum class ErrorCode : int {
  kInvalidArgument = 1,  // bad shape, dtype, device, value; the message names the argument
  kTimeout = 2,          // a peer did not arrive within the timeout; the message names op and peers
  kPeerFailure = 3,      // a peer reported an error or went away
  kOutOfCapacity = 4,    // the communication buffer (or num_worst_tokens) is too small; states the size needed
  kUnsupported = 5,      // a feature this build or backend does not provide (yet)
  kInternal = 6,         // a CUDA / system call failed; the message carries the call and its error
  kBufferFailed = 7,     // an earlier call failed the Buffer (see above); the message names the first cause
};

const char* to_string(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace epcomm
