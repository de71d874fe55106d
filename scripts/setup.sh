#!/usr/bin/env bash
# Installs what epcomm needs on a fresh Debian/Ubuntu machine (idempotent) and configures + builds
# it in ./build. Sourced by bench.sh and test.sh; run it alone to just build.
#   EPCOMM_BUILD_DIR   build folder (default: build)
#   EPCOMM_CMAKE_ARGS  extra CMake arguments (e.g. -DEPCOMM_WITH_CUDA=OFF)
#   EPCOMM_SKIP_PIP=1  do not touch Python packages
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
command -v g++ >/dev/null || need_apt+=(g++)
command -v clang-format >/dev/null || need_apt+=(clang-format)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
[ -f /usr/include/gmock/gmock.h ] || need_apt+=(libgmock-dev)
python3 -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
# Debian's Open MPI: the MPI bootstrap (epcomm_mpi) is built and tested under mpirun when found.
command -v mpicxx >/dev/null || need_apt+=(libopenmpi-dev)
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

# Python environment: NVSHMEM's headers/libraries (needed to compile the low-latency GPU code),
# pybind11 + scikit-build-core (the Python extension), torch + pytest (the Python tests).
if [ "${EPCOMM_SKIP_PIP:-0}" != "1" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
fi
[ -x .venv/bin/python ] && export PATH="$root/.venv/bin:$PATH"

build_dir="${EPCOMM_BUILD_DIR:-build}"
echo "== configure ($build_dir)"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release ${EPCOMM_CMAKE_ARGS:-}
echo "== build"
cmake --build "$build_dir" -j "$(nproc)"
