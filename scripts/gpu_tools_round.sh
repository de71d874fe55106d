#!/usr/bin/env bash
# The speed tools on a GPU machine in one device call (<= 8 minutes; works on ONE GPU): builds
# epcomm-bench (CUPTI kernel time), epcomm-probes and test_fp8_hw_cast, then runs
#   1. test_fp8_hw_cast    hardware FP8 cast bit-exact against src/core/numerics.hpp
#   2. epcomm-probes       write/read rates and flag latency (peer figures only with >= 2 GPUs)
#   3. epcomm-bench        ll, ll-small, normal at R = $TOOLS_RANKS (default 2; ranks beyond the GPUs
#                          time-slice them: correct and with kernel-time rows, but no NCCL baseline
#                          and no meaningful speed), then R = 1 (or one rank per GPU) with the NCCL
#                          baseline, both with "timing": "kernel" rows beside the event rows
#   4. python -m epcomm.bench (only with TOOLS_PYTHON=1: builds the package, CUDA on, into build-tools/py)
# TOOLS_STEPS="fp8 probes bench python" picks steps (default: fp8 probes bench, plus python if TOOLS_PYTHON=1).
# Under $OUT: summary.txt (read first) and tools.tgz (every log and JSON-rows file).
# TOOLS_PREBUILT=<build dir> skips the build and runs the binaries of that CUDA build dir (carried).
#
#   OUT=/tmp/out scripts/gpu_tools_round.sh
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export EPCOMM_TIMEOUT_S="${EPCOMM_TIMEOUT_S:-60}" EPCOMM_TEST_SHARE_GPUS=1
export EPCOMM_COMMIT="${EPCOMM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
dest="${OUT:-$root/tools-out}"
out=/tmp/tools-logs  # packed into $dest/tools.tgz at the end
rm -rf "$out" && mkdir -p "$out" "$dest"
summary="$dest/summary.txt"
: >"$summary"
deadline=$(($(date +%s) + ${TOOLS_DEADLINE_S:-470}))
start=$(date +%s)
say() { echo "[$(($(date +%s) - start)) s] $*" | tee -a "$summary"; }

# step <cap seconds> <name> <command...>: output to $out/<name>.log, capped by the deadline.
step() {
  local cap=$1 name=$2
  shift 2
  local left=$((deadline - $(date +%s) - 10))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 15 ]; then
    say "SKIP $name (no time left)"
    return 1
  fi
  local t0=$(date +%s)
  timeout -k 5 "$cap" "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $(($(date +%s) - t0)) s (cap $cap s)"
  return $rc
}

PY=python3
for py in /opt/torch/.venv/bin/python3 "$root/.venv/bin/python" python3; do
  "$py" -c "import torch" 2>/dev/null && { PY=$py; break; }
done
nvshmem_dir=$("$PY" -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])" 2>/dev/null)
gpus=$(nvidia-smi -L | wc -l)
ranks="${TOOLS_RANKS:-2}"
own=$gpus  # one rank per GPU: the runs with the NCCL baseline
[ "$own" -gt 8 ] && own=8
{ date -u; nvidia-smi -L; nvidia-smi topo -m; } >"$out/machine.log" 2>&1
say "tools round on $gpus GPU(s), commit $EPCOMM_COMMIT, R = $ranks time-sliced when > $gpus"

bt="${TOOLS_PREBUILT:-build-tools}"
if [ -n "${TOOLS_PREBUILT:-}" ]; then
  export LD_LIBRARY_PATH="$root/$bt/src:$nvshmem_dir/lib:/usr/local/cuda/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  say "prebuilt binaries of $bt"
else
  step 300 build cmake -S . -B "$bt" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEPCOMM_WITH_CUDA=ON \
    -DEPCOMM_WITH_NVSHMEM=ON -DNVSHMEM_DIR="$nvshmem_dir" -DEPCOMM_BUILD_PYTHON=OFF
  step 300 build cmake --build "$bt" -j "$(nproc)" --target epcomm-bench epcomm-probes test_fp8_hw_cast
  grep -q "kernel-time rows through CUPTI" "$out/build.log" && say "bench: CUPTI found" || say "bench: NO CUPTI"
fi

steps="${TOOLS_STEPS:-fp8 probes bench$([ "${TOOLS_PYTHON:-0}" = 1 ] && echo ' python')}"
has() { [[ " $steps " == *" $1 "* ]]; }
has fp8 && step 60 fp8 "$bt/tests/gpu/test_fp8_hw_cast"
has fp8 && tail -4 "$out/fp8.log" >>"$summary"

has probes && step 90 probes "$bt/bench/probes/epcomm-probes" --json "$out/probes.jsonl"
has probes && grep -E "NOTE|flag_latency" "$out/probes.log" | head -20 >>"$summary"
# The best rate of each probe and pattern, for the summary.
has probes && "$PY" - "$out/probes.jsonl" >>"$summary" 2>&1 <<'EOF'
import json, sys
best = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "gbps" in r:
        key = (r["probe"], r["pattern"], r["sms"])
        if key not in best or r["gbps"] > best[key]["gbps"]:
            best[key] = r
for (probe, pattern, sms), r in sorted(best.items()):
    params = {k: v for k, v in r.items() if k in ("warps", "unroll", "chunk_bytes", "issuers", "in_flight", "wait")}
    print(f"  best {probe:9s} {pattern:5s} {sms:3d} SMs: {r['gbps']:8.1f} GB/s ({r['gbps_per_sm']:.2f}/SM) {params}")
EOF

bench() {  # bench <name> <epcomm-bench args...>
  local name=$1
  shift
  step "${TOOLS_BENCH_CAP:-120}" "$name" "$bt/bench/epcomm-bench" --json "$out/$name.jsonl" "$@"
  grep -E "^  (epcomm|nccl)|note:|x$" "$out/$name.log" | head -60 >>"$summary"
}
if has bench; then
bench bench-ll-r$ranks -n "$ranks" --workload ll,ll-small --iters "${TOOLS_ITERS:-10}" --warmup 3
bench bench-normal-r$ranks -n "$ranks" --workload normal --num-sms 24 --iters 5 --warmup 2
bench bench-r$own-baseline -n "$own" --workload ll,ll-small,normal --num-sms 8,24 --iters "${TOOLS_ITERS:-10}" --warmup 3
fi

if has python; then
  step 300 python-build env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install -q --no-deps \
    --no-build-isolation --target "$root/build-tools/py" -C build-dir=build/python-tools \
    -C cmake.define.EPCOMM_WITH_CUDA=ON -C cmake.define.NVSHMEM_DIR="$nvshmem_dir" .
  plot=()
  "$PY" -c "import matplotlib" 2>/dev/null && plot=(--plot "$dest/python-bench.png")
  step 150 python-bench env PYTHONPATH="$root/build-tools/py" "$PY" -m epcomm.bench -n "$own" --quiet \
    --json "$out/python-bench.jsonl" ${plot[@]+"${plot[@]}"}
  tail -45 "$out/python-bench.log" >>"$summary"
fi
tar -czf "$dest/tools.tgz" -C "$out" .
say "done: $dest/summary.txt, $dest/tools.tgz"
