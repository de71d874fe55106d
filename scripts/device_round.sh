#!/usr/bin/env bash
# One development round on a GPU machine inside one device call (the device tool allows 10 minutes
# per command and the machine rarely stays warm between calls): build everything once, in parallel,
# then run the steps of ROUND_STEPS in order, each under its own time cap, skipping what no longer
# fits before ROUND_DEADLINE_S. Logs: $OUT/summary.txt (read first) and $OUT/logs.tgz (every log).
#
#   ROUND_STEPS="python ll-tests normal-tests bench-normal bench-ll" scripts/device_round.sh
#
# Steps:
#   python        pip install (CUDA build), the Python tests in the worlds of $ROUND_PY_WORLDS (cuda2)
#   ll-tests      low-latency GPU tests (put path, hardware FP8 cast too), R <= $EPCOMM_TEST_MAX_RANKS
#   ll-timing     low-latency kernel timings and the Buffer's memory (perf_gpu_low_latency)
#   normal-tests  high-throughput GPU tests (fail-safe too), R <= $EPCOMM_TEST_MAX_RANKS
#   (ROUND_RANKS: ranks of epcomm-bench, default one per GPU; more time-slice them, without NCCL)
#   bench-normal  epcomm-bench normal workload at $ROUND_SMS SMs, then each variant of $ROUND_VARIANTS
#                 (name=cmake-args; built in build-<name>; $ROUND_NORMAL_VARIANTS restricts this step to
#                 a subset) and each --nvl-chunk of $ROUND_CHUNKS
#   bench-ll      epcomm-bench ll and ll-small (with ROUND_AB_DIR: alternating with the A/B build)
#
# A/B in the same run: ROUND_AB_DIR=<source tree of another commit, carried along> builds its
# epcomm-bench in build-ab; bench-ll then runs new, base, new, base (rows of the base tagged with
# EPCOMM_COMMIT=$ROUND_AB_COMMIT).
#   compat        the deep_ep compatibility script under torchrun on every GPU
#   moe           examples/moe_layer.py on every GPU (forward + backward against a dense computation)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export EPCOMM_TIMEOUT_S="${EPCOMM_TIMEOUT_S:-30}"
export EPCOMM_TEST_MAX_RANKS="${EPCOMM_TEST_MAX_RANKS:-8}"
export EPCOMM_COMMIT="${EPCOMM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
steps="${ROUND_STEPS:-python ll-tests normal-tests bench-normal bench-ll}"
deadline=$(($(date +%s) + ${ROUND_DEADLINE_S:-570}))
out="${OUT:-$root/round-out}"
logs="/tmp/round-logs"
rm -rf "$logs" && mkdir -p "$logs" "$out"
summary="$out/summary.txt"
start=$(date +%s)
say() { echo "[$(($(date +%s) - start)) s] $*" | tee -a "$summary"; }

# Runs "$@" with at most $1 seconds (less when the deadline is nearer); output to $logs/$2.log.
step() {
  local cap=$1 name=$2
  shift 2
  local left=$((deadline - $(date +%s) - 15))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then
    say "SKIP $name (no time left)"
    return 1
  fi
  local t0
  t0=$(date +%s)
  timeout -k 5 "$cap" "$@" >>"$logs/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $(($(date +%s) - t0)) s (cap $cap s)"
  return $rc
}

python_bin() {
  for py in /opt/torch/.venv/bin/python3 python3; do
    "$py" -c "import torch" 2>/dev/null && { echo "$py"; return; }
  done
}
PY=$(python_bin)
nvshmem_dir=$("$PY" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])" 2>/dev/null)
gpus=$(nvidia-smi -L | wc -l)
jobs=$(nproc)
{
  date -u
  echo "commit $EPCOMM_COMMIT; steps: $steps; python $PY; nvshmem $nvshmem_dir"
  nvidia-smi -L
  nvidia-smi topo -m
} >"$logs/machine.log" 2>&1
say "round on $gpus GPUs, commit $EPCOMM_COMMIT, steps: $steps"

configure() {  # configure <dir> [cmake args...]; sources from $SRC (default .)
  local dir=$1
  shift
  cmake -S "${SRC:-.}" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEPCOMM_WITH_CUDA=ON -DEPCOMM_WITH_NVSHMEM=ON \
    -DNVSHMEM_DIR="$nvshmem_dir" -DEPCOMM_PTXAS_VERBOSE=ON -DEPCOMM_BUILD_PYTHON=OFF "$@"
}
build_main() {
  configure build-gpu && cmake --build build-gpu -j "$jobs" --target epcomm-bench test_gpu_normal_mode \
    test_gpu_normal_errors test_gpu_normal_graphs test_gpu_low_latency test_gpu_low_latency_faults \
    test_gpu_low_latency_coexistence test_gpu_low_latency_put_path test_gpu_failsafe test_fp8_hw_cast \
    perf_gpu_low_latency
}
build_variant() {  # build_variant <name> <cmake args...>
  local name=$1
  shift
  configure "build-$name" -DEPCOMM_BUILD_TESTS=OFF "$@" && cmake --build "build-$name" -j "$jobs" --target epcomm-bench
}
build_python() {
  CMAKE_BUILD_PARALLEL_LEVEL="$jobs" "$PY" -m pip install -v --no-build-isolation -C build-dir=build/python-gpu .
}
has() { [[ " $steps " == *" $1 "* ]]; }

# ---- builds, in parallel -------------------------------------------------------------------------
say "builds ($jobs jobs)"
pids=()
build_main >"$logs/build-main.log" 2>&1 &
pids+=($!)
if has bench-normal || has bench-ll; then
  for variant in ${ROUND_VARIANTS:-}; do
    name=${variant%%=*}
    # shellcheck disable=SC2086
    build_variant "$name" ${variant#*=} >"$logs/build-$name.log" 2>&1 &
    pids+=($!)
  done
fi
if [ -n "${ROUND_AB_DIR:-}" ]; then
  SRC="$ROUND_AB_DIR" build_variant ab >"$logs/build-ab.log" 2>&1 &
  pids+=($!)
fi
if has python || has compat || has moe; then
  build_python >"$logs/build-python.log" 2>&1 &
  pids+=($!)
fi
for pid in "${pids[@]}"; do wait "$pid" || say "a build failed (see build-*.log)"; done
grep -h -E "error:|FAILED:" "$logs"/build-*.log | head -20 | tee -a "$summary"
awk '/Compiling entry function/ { match($0, /[a-z_]*_kernel[A-Za-z0-9_]*/); name = substr($0, RSTART, RLENGTH) }
     /spill stores/ { spill = $0 } /Used [0-9]+ registers/ { if (name != "") print name ": " $0 " |" spill; name = "" }' \
  "$logs/build-main.log" | sed 's/ptxas info *: //' | sort -u >"$logs/ptxas.log"
say "builds done"

bench() {  # bench <log name> <build dir> <epcomm-bench args...>
  local name=$1 dir=$2
  shift 2
  step 200 "$name" "$dir/bench/epcomm-bench" -n "${ROUND_RANKS:-$gpus}" --json "$logs/$name.jsonl" "$@"
  grep -E "^  (epcomm|nccl)|x faster|vs " "$logs/$name.log" | head -60 >>"$summary"
}

for s in $steps; do
  case $s in
    python)
      "$PY" -c "import epcomm; assert epcomm.Buffer.is_sm90_compiled()" >>"$logs/python.log" 2>&1 ||
        say "python: import check failed"
      EPCOMM_TEST_WORLDS="${ROUND_PY_WORLDS:-cuda2}" EPCOMM_TEST_RUN_TIMEOUT_S=60 \
        step "${ROUND_PY_CAP:-200}" python "$PY" -X faulthandler -m pytest python/tests ${ROUND_PY_ARGS:--x} -q -rs -p no:cacheprovider \
        --durations=10
      tail -25 "$logs/python.log" >>"$summary"
      ;;
    moe)
      step 120 moe "$PY" examples/moe_layer.py --ranks "$gpus" --cuda
      tail -5 "$logs/moe.log" >>"$summary"
      ;;
    compat)
      step 120 compat "$PY" -m torch.distributed.run --nproc-per-node "$gpus" python/tests/deep_ep_compat_script.py
      tail -8 "$logs/compat.log" >>"$summary"
      ;;
    ll-tests)
      for t in test_gpu_low_latency test_gpu_low_latency_faults test_gpu_low_latency_coexistence \
        test_gpu_low_latency_put_path test_fp8_hw_cast; do
        step 150 "$t" "build-gpu/tests/gpu/$t" --gtest_color=no
        grep -E "^\[ +(FAILED|PASSED) +\]|tests? ran" "$logs/$t.log" | sort -u | head -20 >>"$summary"
      done
      ;;
    ll-timing)
      EPCOMM_LL_TIMING=1 step 120 ll-timing build-gpu/tests/gpu/perf_gpu_low_latency --gtest_color=no
      step 60 ll-memory build-gpu/tests/gpu/test_gpu_low_latency --gtest_color=no \
        --gtest_filter=LowLatencyGpu.BufferMemoryAtTheBenchmarkShape
      grep -h -e "\[ll-timing\]" -e "\[ll-memory\]" "$logs/ll-timing.log" "$logs/ll-memory.log" >>"$summary"
      ;;
    normal-tests)
      for t in test_gpu_normal_mode test_gpu_normal_errors test_gpu_normal_graphs test_gpu_failsafe; do
        step 150 "$t" "build-gpu/tests/gpu/$t" --gtest_color=no
        grep -E "^\[ +(FAILED|PASSED) +\]|tests? ran" "$logs/$t.log" | sort -u | head -20 >>"$summary"
      done
      ;;
    bench-normal)
      sms="${ROUND_SMS:-8,16,24}"
      bench bench-normal build-gpu --workload normal --num-sms "$sms" --iters "${ROUND_ITERS:-20}"
      for variant in ${ROUND_NORMAL_VARIANTS:-${ROUND_VARIANTS:-}}; do
        name=${variant%%=*}
        bench "bench-normal-$name" "build-$name" --workload normal --num-sms "$sms" --iters "${ROUND_ITERS:-20}" \
          --no-baseline
      done
      for chunk in ${ROUND_CHUNKS:-}; do
        bench "bench-normal-chunk$chunk" build-gpu --workload normal --num-sms "$sms" --iters "${ROUND_ITERS:-20}" \
          --no-baseline --nvl-chunk "$chunk"
      done
      ;;
    bench-ll)
      bench bench-ll build-gpu --workload ll,ll-small --iters "${ROUND_ITERS:-20}"
      if [ -n "${ROUND_AB_DIR:-}" ]; then
        EPCOMM_COMMIT="${ROUND_AB_COMMIT:-ab}" bench bench-ll-ab build-ab --workload ll,ll-small \
          --iters "${ROUND_ITERS:-20}" --no-baseline
        bench bench-ll-2 build-gpu --workload ll,ll-small --iters "${ROUND_ITERS:-20}" --no-baseline
        EPCOMM_COMMIT="${ROUND_AB_COMMIT:-ab}" bench bench-ll-ab2 build-ab --workload ll,ll-small \
          --iters "${ROUND_ITERS:-20}" --no-baseline
      fi
      for variant in ${ROUND_VARIANTS:-}; do
        name=${variant%%=*}
        bench "bench-ll-$name" "build-$name" --workload ll,ll-small --iters "${ROUND_ITERS:-20}" --no-baseline
      done
      ;;
    *) say "unknown step $s" ;;
  esac
done

cat "$logs"/*.jsonl >"$out/results.jsonl" 2>/dev/null
cp "$logs/ptxas.log" "$out/" 2>/dev/null
tar -C /tmp -czf "$out/logs.tgz" round-logs
say "done"
