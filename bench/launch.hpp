// Starting the ranks of a run: epcomm-bench -n N re-executes itself as N local processes through
// the launcher library, each finding the others with epcomm::bootstrap_from_env().
#pragma once

namespace epcomm::bench {

// Runs this executable with the same arguments as `num_ranks` ranks; rank 0's standard output is
// passed through unchanged (the table), every other line is prefixed with "[rank K]". Returns the
// exit status for the parent: 0 when every rank succeeded.
int launch_ranks(int num_ranks, int argc, const char* const* argv);

}  // namespace epcomm::bench
