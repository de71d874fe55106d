#!/usr/bin/env bash
# Builds epcomm with CUDA and runs the BENCHMARKS.md suite with epcomm-bench on every GPU of this
# machine (meant for 8 x H200): normal mode at 8..48 SMs, low-latency 128 and 1 token, uniform and
# skewed routing, each with the NCCL all_to_all baseline in the same run.
#
#   scripts/bench_gpu.sh [build|run|all] [extra epcomm-bench arguments...]     (default: all)
#
# Writes under $OUT (default ./bench-out): results.jsonl (every row, BENCHMARKS.md "Recording
# results"), one <part>.jsonl and <part>.log per part, build.log and machine.txt. The build stays
# in $BUILD (default build-bench), so `build` then `run` can be two calls on a warm machine.
# Environment: EPCOMM_COMMIT (the commit to record; default: git rev-parse there, else "unknown"),
# PART_TIMEOUT_S (default 480: a part that runs longer is stopped), EPCOMM_TIMEOUT_S (library waits,
# default here 60), ITERS (default 30), NUM_SMS (default 8,16,24,32,48), PARTS (default
# "normal normal-skewed ll ll-skewed ll-small").
set -euo pipefail
cd "$(dirname "$0")/.."

phase=${1:-all}
[[ $# -gt 0 ]] && shift
OUT=${OUT:-$PWD/bench-out}
BUILD=${BUILD:-build-bench}
ITERS=${ITERS:-30}
NUM_SMS=${NUM_SMS:-8,16,24,32,48}
PARTS=${PARTS:-normal normal-skewed ll ll-skewed ll-small}
PART_TIMEOUT_S=${PART_TIMEOUT_S:-480}
mkdir -p "$OUT"

# Never NVLink multicast (KINDS.md): NCCL, NVSHMEM and PyTorch.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export EPCOMM_TIMEOUT_S=${EPCOMM_TIMEOUT_S:-60}
if [[ -z "${EPCOMM_COMMIT:-}" ]]; then
  EPCOMM_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
fi
export EPCOMM_COMMIT

build() {
  echo "== build ($BUILD)"
  { cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEPCOMM_WITH_CUDA=ON -DEPCOMM_BUILD_TESTS=OFF \
      && cmake --build "$BUILD" -j "$(nproc)" --target epcomm-bench; } > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; echo "build failed (full log: $OUT/build.log)"; exit 1; }
  tail -3 "$OUT/build.log"
}

describe_machine() {
  { date -u +%Y-%m-%dT%H:%M:%SZ; echo "commit $EPCOMM_COMMIT"; nvidia-smi -L; nvidia-smi topo -m;
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv;
    nvcc --version | tail -2; nproc; } > "$OUT/machine.txt" 2>&1 || true
}

# One part of the suite: its own process group of ranks, its own JSON and log.
run_part() {
  local part=$1; shift
  local args=()
  case $part in
    normal)        args=(--workload normal --num-sms "$NUM_SMS" --routing uniform) ;;
    normal-skewed) args=(--workload normal --num-sms "$NUM_SMS" --routing skewed) ;;
    ll)            args=(--workload ll --routing uniform) ;;
    ll-skewed)     args=(--workload ll --routing skewed) ;;
    ll-small)      args=(--workload ll-small --routing uniform) ;;
    *) echo "unknown part '$part'"; return 1 ;;
  esac
  echo "== $part"
  rm -f "$OUT/$part.jsonl"
  local status=0
  timeout -k 15 "$PART_TIMEOUT_S" "$BUILD/bench/epcomm-bench" -n "$NGPU" --backend cuda --iters "$ITERS" \
    --json "$OUT/$part.jsonl" "${args[@]}" "$@" > "$OUT/$part.log" 2>&1 || status=$?
  local rows=0
  [[ -f "$OUT/$part.jsonl" ]] && rows=$(wc -l < "$OUT/$part.jsonl")
  if [[ $status -eq 0 ]]; then
    echo "   ok, $rows rows (table: $OUT/$part.log)"
  else
    echo "   FAILED with status $status, $rows rows kept; last lines of $OUT/$part.log:"
    tail -25 "$OUT/$part.log"
  fi
  grep -E "^note: |^  .*: .* us vs .* us: " "$OUT/$part.log" || true  # skipped parts, failed checks, speed-ups
  return $status
}

# The rows of every part, one short line each (the full tables are in the logs).
summary() {
  python3 - "$OUT/results.jsonl" <<'PY' || cat "$OUT/results.jsonl"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if rows:
    print(f"{rows[0]['machine']}, commit {rows[0]['commit']}, {rows[0]['date']}, {rows[0]['ranks']} ranks")
print(f"{'impl':<16}{'workload':<16}{'op':<17}{'dtype':<6}{'SMs':>4}{'us':>10}{'GB/s':>8}  us min..max over ranks")
for r in rows:
    gbps = "-" if r["gbps_median"] is None else f"{r['gbps_median']:.1f}"
    print(f"{r['impl']:<16}{r['workload']:<16}{r['op']:<17}{r['dtype'] or '-':<6}{str(r['num_sms'] or '-'):>4}"
          f"{r['time_us_median']:>10.1f}{gbps:>8}  {r['time_us_min']:.1f}..{r['time_us_max']:.1f}")
PY
}

run() {
  NGPU=$(nvidia-smi -L | grep -c '^GPU ')
  [[ $NGPU -ge 2 ]] || { echo "need at least 2 GPUs, found $NGPU"; exit 1; }
  describe_machine
  local failed=()
  for part in $PARTS; do run_part "$part" "$@" || failed+=("$part"); done
  # results.jsonl: every part's rows, in suite order.
  : > "$OUT/results.jsonl"
  for part in $PARTS; do
    if [[ -f "$OUT/$part.jsonl" ]]; then cat "$OUT/$part.jsonl" >> "$OUT/results.jsonl"; fi
  done
  echo "== $(wc -l < "$OUT/results.jsonl") rows in $OUT/results.jsonl"
  summary
  [[ ${#failed[@]} -eq 0 ]] || { echo "failed parts: ${failed[*]}"; exit 1; }
}

case $phase in
  build) build ;;
  run) run "$@" ;;
  all) build; run "$@" ;;
  *) echo "usage: $0 [build|run|all] [epcomm-bench arguments...]"; exit 2 ;;
esac
