#!/usr/bin/env bash
# The main job: install, build, and run epcomm-bench. Uses the GPUs when there are any, else the CPU
# backend with a workload that finishes in seconds. Extra arguments go to epcomm-bench.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
"$root/${EPCOMM_BUILD_DIR:-build}/bench/epcomm-bench" "$@"
