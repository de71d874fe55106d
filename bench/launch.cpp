#include "launch.hpp"

#include <cstdio>
#include <string>
#include <vector>

#include "launcher/launcher.hpp"

namespace epcomm::bench {

int launch_ranks(int num_ranks, int argc, const char* const* argv) {
  // /proc/self/exe: the very binary that is running, whatever PATH says.
  std::vector<std::string> command{"/proc/self/exe"};
  for (int i = 1; i < argc; ++i) command.emplace_back(argv[i]);

  launch::LaunchOptions options;
  options.num_ranks = num_ranks;
  options.on_line = [](int rank, launch::OutputStream stream, std::string_view line) {
    std::FILE* out = stream == launch::OutputStream::kStdout ? stdout : stderr;
    if (rank == 0 && stream == launch::OutputStream::kStdout) {
      std::fprintf(out, "%.*s\n", static_cast<int>(line.size()), line.data());
    } else {
      std::fprintf(out, "[rank %d] %.*s\n", rank, static_cast<int>(line.size()), line.data());
    }
    std::fflush(out);
  };
  const launch::LaunchResult result = launch::launch_program(options, command);
  if (result.ok()) return 0;
  std::fprintf(stderr, "epcomm-bench: the run failed\n");
  int status = 1;
  for (const launch::RankResult& rank : result.ranks) {
    if (rank.ok()) continue;
    std::fprintf(stderr, "  rank %d %s\n", rank.rank, rank.how().c_str());
    if (rank.rank == result.first_failure && rank.exited && rank.exit_code != 0) status = rank.exit_code;
  }
  return status;
}

}  // namespace epcomm::bench
