#!/usr/bin/env bash
# The GPU test suite in one command, for a GPU machine (no network needed): configure + build with
# every core, print the kernels' register / spill report, run every test labelled `gpu` (normal and
# low-latency mode against the CPU reference), the high-throughput throughput probe, then the Python
# front end's GPU tests. Logs go to $OUT (or ./gpu_suite_logs).
#
#   scripts/gpu_suite.sh                        # all GPUs: R = 2, 3, 4, 8 ranks on distinct GPUs
#   CUDA_VISIBLE_DEVICES=0 scripts/gpu_suite.sh # all ranks time-slice one GPU (small tests only)
#
# Environment:
#   EPCOMM_BUILD_DIR          build folder (default: build-gpu)
#   EPCOMM_CMAKE_ARGS         extra CMake arguments
#   EPCOMM_TEST_MAX_RANKS     largest R the tests use (default 8)
#   EPCOMM_GPU_TESTS          ctest -R regex of the tests to run (default: all `gpu` tests)
#   EPCOMM_SKIP_PERF=1        skip the throughput probe (it needs >= 2 GPUs anyway)
#   EPCOMM_SKIP_PYTHON=1      skip the Python front end's GPU tests (python/tests/run_gpu.sh)
#   EPCOMM_PERF_RANKS         ranks of the probe (default: min(GPUs, 8))
#   EPCOMM_TIMEOUT_S          timeout of every wait (default here: 60 s, so a broken protocol fails
#                             fast and names the phase and peer instead of waiting 100 s per call)
set -uo pipefail
export EPCOMM_TIMEOUT_S="${EPCOMM_TIMEOUT_S:-60}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/gpu_suite_logs}"
mkdir -p "$out"
build="${EPCOMM_BUILD_DIR:-build-gpu}"
status=0

{
  echo "== $(date -u) $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1
  nvidia-smi topo -m 2>&1
  nvcc --version | tail -1
  cmake --version | head -1
} > "$out/machine.txt"

echo "== configure + build ($build, $(nproc) jobs)"
if ! cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEPCOMM_WITH_CUDA=ON -DEPCOMM_PTXAS_VERBOSE=ON \
    -DEPCOMM_TEST_TIMEOUT=1800 \
    ${EPCOMM_CMAKE_ARGS:-} > "$out/configure.log" 2>&1; then
  tail -30 "$out/configure.log"; echo "configure failed (log: $out/configure.log)"; exit 1
fi
# -Xptxas -v output of the library's kernels (registers, spills) lands in the build log.
rm -f "$build/src/cuda/CMakeFiles/epcomm_cuda.dir/normal/kernels/"*.o
if ! cmake --build "$build" -j "$(nproc)" > "$out/build.log" 2>&1; then
  grep -E "error|FAILED" "$out/build.log" | head -30; echo "build failed (log: $out/build.log)"; exit 1
fi
# One line per kernel: name, registers, spills.
awk '/Compiling entry function/ { match($0, /_ZN[^ ]*_kernel/); name = substr($0, RSTART, RLENGTH) }
     /bytes stack frame/ { frame = $0 } /Used [0-9]+ registers/ { if (name != "") print name ": " $0 " |" frame; name = "" }' \
  "$out/build.log" | sed 's/ptxas info *: //' | sort -u > "$out/ptxas.txt"
cat "$out/ptxas.txt"

echo "== GPU tests (logs: $out/ctest.log, junit: $out/ctest.xml)"
ctest --test-dir "$build" -L gpu ${EPCOMM_GPU_TESTS:+-R "$EPCOMM_GPU_TESTS"} --output-on-failure \
  --output-junit "$out/ctest.xml" --timeout 1800 > "$out/ctest.log" 2>&1 || status=1
grep -E "tests passed|Test +#|Failed|Not Run" "$out/ctest.log" | tail -60

if [ "${EPCOMM_SKIP_PERF:-0}" != "1" ]; then
  echo "== throughput probe (log: $out/perf.log)"
  "$build/tests/gpu/perf_gpu_normal" --gtest_also_run_disabled_tests --gtest_filter='NormalModePerf.*' \
    > "$out/perf.log" 2>&1 || status=1
  grep -E "^(op|dispatch|combine)|SKIPPED|FAILED|PASSED" "$out/perf.log" | head -80
fi
if [ "${EPCOMM_SKIP_PYTHON:-0}" != "1" ]; then
  echo "== Python front end on the GPUs (logs: $out/python)"
  OUT="$out/python" python/tests/run_gpu.sh || status=1
fi

echo "== done (status $status); logs in $out"
exit $status
