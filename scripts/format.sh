#!/usr/bin/env bash
# Applies .clang-format to every C++/CUDA file (--check: only report, exit 1 if a file would change).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
files=$(git ls-files '*.cpp' '*.hpp' '*.cu' '*.cuh' | grep -v '^wip/')
if [ "${1:-}" = "--check" ]; then
  clang-format --dry-run -Werror $files
else
  clang-format -i $files
fi
