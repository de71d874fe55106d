// G, the ranks per NVLink domain ("node"), when BufferOptions::ranks_per_node is 0 (SPEC §3.6).
#pragma once

namespace epcomm {

// `requested` when not 0; else $EPCOMM_RANKS_PER_NODE, else $LOCAL_WORLD_SIZE (torchrun, SLURM
// wrappers), each capped at `num_ranks`; else `num_ranks` (every rank in one node). The C++ Buffer
// has no host names to group by (Python's Buffer does that itself). Throws Error(kInvalidArgument)
// naming the variable for a value that is not a positive integer.
int resolve_ranks_per_node(int requested, int num_ranks);

}  // namespace epcomm
