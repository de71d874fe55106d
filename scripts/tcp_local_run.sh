#!/usr/bin/env bash
# Starts N ranks of a program on this machine with torchrun's variables (RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT) and a fresh
# EPCOMM_BOOTSTRAP_SECRET, so that epcomm::tcp_bootstrap_from_env() joins them over TCP on
# loopback. Exits with the first non-zero status; a rank still running after TIMEOUT_S (default
# 120) seconds, or after another rank failed, is killed.
#   scripts/tcp_local_run.sh 4 build/examples/epcomm_example_round_trip
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N program [args...]" >&2
  exit 2
fi
n="$1"
shift
# A free port pair (the bootstrap takes MASTER_PORT + 1): ask the kernel for one, then use it.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export MASTER_ADDR=127.0.0.1 MASTER_PORT="$((port - 1))" WORLD_SIZE="$n" LOCAL_WORLD_SIZE="$n"
export EPCOMM_BOOTSTRAP_SECRET="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
pids=()
for ((r = 0; r < n; r++)); do
  RANK="$r" LOCAL_RANK="$r" "$@" > >(sed "s/^/[rank $r] /") 2>&1 &
  pids+=("$!")
done
deadline=$((SECONDS + ${TIMEOUT_S:-120}))
status=0
remaining=("${pids[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      wait "$pid"
      rc=$?
      [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if [ ${#remaining[@]} -gt 0 ] && { [ $status -ne 0 ] || [ $SECONDS -ge $deadline ]; }; then
    [ $status -eq 0 ] && { echo "tcp_local_run: timed out after ${TIMEOUT_S:-120} s" >&2; status=124; }
    for pid in "${remaining[@]}"; do kill "$pid" 2>/dev/null; done
    wait
    break
  fi
  sleep 0.1
done
exit $status
