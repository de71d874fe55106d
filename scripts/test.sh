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
echo "== the C++ round trip under each launcher: epcomm-run, mpirun (MPI bootstrap), torchrun's variables (TCP)"
example="$build_dir/examples/epcomm_example_round_trip"
"$build_dir/tools/epcomm-run" -n 4 "$example"
if grep -q EPCOMM_EXAMPLE_WITH_MPI "$build_dir/build.ninja" 2>/dev/null; then  # built with MPI
  mpi_flags=""; [ "$(id -u)" -eq 0 ] && mpi_flags="--allow-run-as-root"
  mpirun $mpi_flags --oversubscribe -n 4 "$example"
fi
"$root/scripts/tcp_local_run.sh" 4 "$example"
echo "== cmake --install, then a project using find_package(epcomm)"
prefix="$(cd "$build_dir" && pwd)/install"
cmake --install "$build_dir" --prefix "$prefix" > /dev/null
cmake -S examples/consumer -B "$build_dir/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" > /dev/null
cmake --build "$build_dir/consumer" > /dev/null
"$prefix/bin/epcomm-run" -n 2 "$build_dir/consumer/round_trip"
echo "== Python suite (CPU backend)"
python3 -m pip install -q --no-build-isolation -C cmake.define.EPCOMM_WITH_CUDA=OFF -C build-dir="$build_dir/python" .
python3 -m pytest python/tests -q
