// What the fail-safe tests share (SPEC §5): error expectations and a Bootstrap over a sub-group.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "epcomm/bootstrap.hpp"
#include "epcomm/error.hpp"

namespace epcomm::testing {

// The epcomm::Error `call` throws, or none.
inline std::optional<Error> error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    return e;
  }
  return std::nullopt;
}

// Checks that `call` throws Error(code) mentioning every word; returns its message ("" if none).
inline std::string expect_failure(const std::function<void()>& call, ErrorCode code,
                                  const std::vector<std::string>& words) {
  const std::optional<Error> error = error_of(call);
  if (!error) {
    ADD_FAILURE() << "expected an epcomm::Error (" << to_string(code) << "), nothing was thrown";
    return "";
  }
  EXPECT_EQ(error->code(), code) << error->what();
  for (const std::string& word : words)
    EXPECT_NE(std::string(error->what()).find(word), std::string::npos)
        << "message lacks '" << word << "': " << error->what();
  return error->what();
}

// Ranks [first, first + size) of `parent` as a group of their own. Every rank of the parent must
// make the same collective calls at the same time (each sub-group builds the same Buffers).
class SubGroup final : public Bootstrap {
 public:
  SubGroup(Bootstrap& parent, int size) : parent_(parent), size_(size), first_(parent.rank() / size * size) {}
  int rank() const override { return parent_.rank() - first_; }
  int size() const override { return size_; }
  void all_gather(const void* send, void* recv, size_t bytes) override {
    std::vector<char> everyone(size_t(parent_.size()) * bytes);
    parent_.all_gather(send, everyone.data(), bytes);
    std::copy(everyone.begin() + first_ * bytes, everyone.begin() + (first_ + size_) * bytes, static_cast<char*>(recv));
  }
  void barrier() override { parent_.barrier(); }

 private:
  Bootstrap& parent_;
  int size_, first_;
};

}  // namespace epcomm::testing
