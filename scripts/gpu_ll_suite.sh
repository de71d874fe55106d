#!/usr/bin/env bash
# Low-latency mode on GPUs in one go: build (CUDA + NVSHMEM), run the low-latency GPU tests, then
# the indicative timings. Logs go to $OUT (the device tool's output folder) or ./gpu-ll-logs:
#   summary.txt   what ran and how it ended (read this first)
#   machine.txt   nvidia-smi, topology, toolchain, NVSHMEM found
#   build.log     configure + build (tail) ;  ptxas.txt  registers / spills of the LL kernels
#   tests.log     gtest output of every LL test binary ;  timing.log  [ll-timing] lines
#   memory.log    the Buffer's GPU memory ([ll-memory]) with epcomm's NVSHMEM settings and with
#                 NVSHMEM's own defaults, then NVSHMEM's INIT/MEM/TEAM log of one run (memory-debug.log)
#
# Usage: scripts/gpu_ll_suite.sh [all|build|test|timing|memory]      (default: all)
#   EPCOMM_LL_FILTER=...    gtest filter for the test stage (default: everything)
#   EPCOMM_TEST_MAX_RANKS=N at most N ranks (default 8; never more than the GPUs present)
#   EPCOMM_BUILD_DIR        build folder (default: build-gpu-ll)
#   EPCOMM_TIMEOUT_S        timeout of every wait (default here: 60 s)
# The stages can run as separate commands (the build folder stays): build, then test, then timing.
# Needs on the machine: nvcc, cmake >= 3.24, ninja, a python3 with the pip package
# nvidia-nvshmem-cu13, and GoogleTest. Without network, GoogleTest can come along as Debian
# packages: here `mkdir -p .deps && (cd .deps && apt-get download libgtest-dev libgmock-dev googletest)`,
# carry `.deps`; this script unpacks them. NVSHMEM wheels carried in `.whl` are installed too.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
stage="${1:-all}"
out="${OUT:-$root/gpu-ll-logs}"
build="${EPCOMM_BUILD_DIR:-build-gpu-ll}"
mkdir -p "$out"
summary="$out/summary.txt"
say() { echo "== $*" | tee -a "$summary"; }

# NVLink multicast must stay off on these machines (shared host).
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# A broken protocol fails in a minute, naming the phase and the peer, instead of 100 s per wait.
export EPCOMM_TIMEOUT_S="${EPCOMM_TIMEOUT_S:-60}"

find_nvshmem() {
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  for py in python3 /opt/torch/.venv/bin/python3 "$root/.venv/bin/python"; do
    dir=$("$py" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])" 2>/dev/null) && [ -n "$dir" ] &&
      [ -f "$dir/include/nvshmem.h" ] && { echo "$dir"; return 0; }
  done
  return 1
}

gtest_args() {
  if [ -f /usr/include/gtest/gtest.h ]; then return 0; fi
  if ls .deps/*.deb >/dev/null 2>&1; then
    mkdir -p .deps/root
    for f in .deps/*.deb; do dpkg -x "$f" .deps/root; done
    echo "-DCMAKE_PREFIX_PATH=$root/.deps/root/usr"
    return 0
  fi
  return 1
}

do_build() {
  {
    nvidia-smi; nvidia-smi topo -m; nvcc --version; cmake --version; ninja --version
    echo "nproc: $(nproc)"
  } >"$out/machine.txt" 2>&1
  local nvshmem extra
  if ! nvshmem=$(find_nvshmem); then
    say "FAIL build: no python3 with nvidia-nvshmem-cu13 (pip download it here into .whl and carry .whl)"
    return 1
  fi
  echo "NVSHMEM: $nvshmem ($(ls "$nvshmem/lib" | tr '\n' ' '))" >>"$out/machine.txt"
  if ! extra=$(gtest_args); then
    say "FAIL build: GoogleTest not installed and no .deps/*.deb carried (see the header of this script)"
    return 1
  fi
  say "configure + build in $build (NVSHMEM from $nvshmem)"
  local log="$out/build.full.log"
  if ! cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEPCOMM_WITH_CUDA=ON -DEPCOMM_WITH_NVSHMEM=ON \
      -DNVSHMEM_DIR="$nvshmem" -DEPCOMM_PTXAS_VERBOSE=ON -DEPCOMM_BUILD_PYTHON=OFF $extra ${EPCOMM_CMAKE_ARGS:-} \
      >"$log" 2>&1; then
    tail -n 200 "$log" >"$out/build.log"; rm -f "$log"
    say "FAIL configure (build.log)"
    return 1
  fi
  cmake --build "$build" -j "$(nproc)" --target test_gpu_low_latency test_gpu_low_latency_faults \
    test_gpu_low_latency_coexistence perf_gpu_low_latency >>"$log" 2>&1
  local status=$?
  # ptxas -v of the low-latency kernels: one line per kernel with registers and spills.
  awk '/Compiling entry function/ { name = "" }
       /Compiling entry function/ && match($0, /(dispatch|combine)_(send|recv)_kernel(I[il])?/) { name = substr($0, RSTART, RLENGTH) }
       /spill stores/ { spill = $0 }
       /Used [0-9]+ registers/ && name != "" { print name ": " $0 " |" spill }' \
    "$log" | sed 's/ptxas info *: //' | sort -u >"$out/ptxas.txt"
  tail -n 300 "$log" >"$out/build.log"; rm -f "$log"
  if [ $status -ne 0 ]; then say "FAIL build (build.log)"; return 1; fi
  say "build ok; ptxas: $(wc -l <"$out/ptxas.txt") kernel lines in ptxas.txt"
}

do_test() {
  local status=0
  for t in test_gpu_low_latency test_gpu_low_latency_faults test_gpu_low_latency_coexistence; do
    local bin="$build/tests/gpu/$t"
    [ -x "$bin" ] || { say "FAIL $t: not built"; status=1; continue; }
    say "run $t"
    local start
    start=$(date +%s)
    "$bin" --gtest_color=no ${EPCOMM_LL_FILTER:+--gtest_filter=$EPCOMM_LL_FILTER} >>"$out/tests.log" 2>&1
    local rc=$?
    say "$t: exit $rc after $(( $(date +%s) - start )) s"
    [ $rc -eq 0 ] || status=1
  done
  grep -E "^\[ +(OK|FAILED|SKIPPED) +\] [A-Za-z]" "$out/tests.log" | sort | uniq >>"$summary"
  return $status
}

do_timing() {
  local bin="$build/tests/gpu/perf_gpu_low_latency"
  [ -x "$bin" ] || { say "FAIL timing: not built"; return 1; }
    local status=0
  say "timing (programmatic dependent launch on)"
  EPCOMM_LL_TIMING=1 "$bin" --gtest_color=no >>"$out/timing.log" 2>&1 || status=1
  say "timing (EPCOMM_LL_PDL=0)"
  echo "---- EPCOMM_LL_PDL=0 ----" >>"$out/timing.log"
  EPCOMM_LL_TIMING=1 EPCOMM_LL_PDL=0 "$bin" --gtest_color=no >>"$out/timing.log" 2>&1 || status=1
  grep -h -e "\[ll-timing\]" -e "\[ll-memory\]" -e "^---- EPCOMM" "$out/timing.log" "$out/tests.log" 2>/dev/null >>"$summary"
  return $status
}

do_memory() {
  local bin="$build/tests/gpu/test_gpu_low_latency" filter="LowLatencyGpu.BufferMemoryAtTheBenchmarkShape"
  [ -x "$bin" ] || { say "FAIL memory: not built"; return 1; }
  local status=0
  say "memory: epcomm's NVSHMEM settings"
  "$bin" --gtest_color=no --gtest_filter="$filter" >>"$out/memory.log" 2>&1 || status=1
  say "memory: NVSHMEM's defaults (NCCL teams, 512 MiB heap granularity, proxy thread)"
  echo "---- NVSHMEM defaults ----" >>"$out/memory.log"
  NVSHMEM_DISABLE_NCCL=0 NVSHMEM_CUMEM_GRANULARITY=536870912 NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=0 \
    "$bin" --gtest_color=no --gtest_filter="$filter" >>"$out/memory.log" 2>&1 || status=1
  NVSHMEM_DEBUG=INFO NVSHMEM_DEBUG_SUBSYS=INIT,MEM,TEAM "$bin" --gtest_color=no --gtest_filter="$filter" \
    >"$out/memory-debug.log" 2>&1 || status=1
  grep -h -e "\[ll-memory\]" -e "^---- NVSHMEM" "$out/memory.log" >>"$summary"
  return $status
}

rc=0
case "$stage" in
  build) do_build || rc=1 ;;
  test) do_test || rc=1 ;;
  timing) do_timing || rc=1 ;;
  memory) do_memory || rc=1 ;;
  all) { do_build && { do_test; t=$?; do_timing; do_memory; m=$?; [ $t -eq 0 ] && [ $m -eq 0 ]; }; } || rc=1 ;;
  *) echo "usage: $0 [all|build|test|timing|memory]"; exit 2 ;;
esac
say "done: exit $rc"
exit $rc
