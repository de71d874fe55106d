#!/usr/bin/env bash
# Installs, builds and runs the CPU test suites (C++ and Python). This is what CI runs.
# The GPU suites are separate: scripts/gpu_suite.sh on a GPU machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
build_dir="${EPCOMM_BUILD_DIR:-build}"
echo "== C++ CPU suite"
ctest --test-dir "$build_dir" -L cpu --output-on-failure -j "$(nproc)" --timeout 900
