#!/usr/bin/env bash
# Installs, builds and runs the CPU test suites (C++ and Python). This is what CI runs.
# The GPU suites are separate: scripts/gpu_suite.sh on a GPU machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
build_dir="${EPCOMM_BUILD_DIR:-build}"
echo "== clang-format check (scripts/format.sh fixes)"
"$root/scripts/format.sh" --check
echo "== C++ CPU suite"
ctest --test-dir "$build_dir" -L cpu --output-on-failure -j "$(nproc)" --timeout 900
echo "== cmake --install, then a project using find_package(epcomm)"
prefix="$(cd "$build_dir" && pwd)/install"
cmake --install "$build_dir" --prefix "$prefix" > /dev/null
cmake -S examples/consumer -B "$build_dir/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" > /dev/null
cmake --build "$build_dir/consumer" > /dev/null
"$prefix/bin/epcomm-run" -n 2 "$build_dir/consumer/round_trip"
echo "== Python suite (CPU backend)"
python3 -m pip install -q --no-build-isolation -C cmake.define.EPCOMM_WITH_CUDA=OFF -C build-dir="$build_dir/python" .
python3 -m pytest python/tests -q
