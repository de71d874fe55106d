// Every environment variable epcomm's C++ code reads, in one table (name, type, default, range,
// documentation), and the only functions that read them. A value outside its range or of the wrong
// form is an Error(kInvalidArgument) naming the variable, never a silent default. docs/ENVIRONMENT.md
// documents the same table (tests/cpu/test_core.cpp checks that they agree) plus the variables the
// Python front end and the test harness read.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace epcomm {

enum class EnvType : uint8_t {
  kSeconds,  // a finite decimal number of seconds (fractions allowed)
  kInt,      // a decimal integer
  kFlag,     // 0 or 1
  kText,     // any non-empty text (an address, a commit id, a directory)
};

struct EnvVariable {
  const char* name;
  EnvType type;
  const char* fallback;  // what applies when unset, in words
  double min;            // kSeconds / kInt: the accepted range, inclusive
  double max;
  const char* reader;  // who reads it: "core", "cuda", "launcher", "bench", "test hook"
  const char* doc;
};

// The whole table, in the order of docs/ENVIRONMENT.md.
std::span<const EnvVariable> environment_table();
// The entry of `name`; Error(kInternal) if it is not in the table (a reader must be declared there).
const EnvVariable& environment_variable(const char* name);

// Parses `text` as the value of `variable`; Error(kInvalidArgument) "<NAME>: expected ..., got '<text>'".
double parse_seconds(const EnvVariable& variable, const std::string& text);
int64_t parse_int(const EnvVariable& variable, const std::string& text);
bool parse_flag(const EnvVariable& variable, const std::string& text);

// Reads the variable: nullopt when unset or empty, else the parsed and range-checked value.
std::optional<std::string> env_text(const char* name);
std::optional<double> env_seconds(const char* name);
std::optional<int64_t> env_int(const char* name);
std::optional<bool> env_flag(const char* name);

}  // namespace epcomm
