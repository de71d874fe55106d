#!/usr/bin/env bash
# The Python suites on a GPU machine in one go (no network needed): builds and installs epcomm with
# its CUDA backend (--no-build-isolation: torch, pybind11, scikit-build-core, pytest and
# nvidia-nvshmem-cu13 must be installed), runs every Python test in the CPU worlds and in the CUDA
# worlds the visible GPUs allow (2, 4, 8 ranks; features the CUDA backend reports unsupported are
# skips whose reason says so), then the DeepEP compatibility script and the MoE example on all GPUs.
# Logs go to $OUT (or ./python_gpu_logs).
#   EPCOMM_TEST_WORLDS=cuda2,cuda8 python/tests/run_gpu.sh   # only some worlds
set -uo pipefail
export EPCOMM_TIMEOUT_S="${EPCOMM_TIMEOUT_S:-60}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/python_gpu_logs}"
mkdir -p "$out"
status=0

echo "== pip install (CUDA build, $(nproc) jobs)"
if ! CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip install -v --no-build-isolation \
    -C build-dir=build/python-gpu . > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "build failed (log: $out/build.log)"; exit 1
fi
python3 -c "import epcomm; assert epcomm.Buffer.is_sm90_compiled(), 'built without sm_90 kernels'" || exit 1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")

echo "== pytest (GPUs visible: $gpus)"
python3 -m pytest python/tests -q -rs --durations=20 2>&1 | tee "$out/pytest.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "$gpus" -ge 2 ]; then
  echo "== deep_ep_compat_script.py under torchrun on $gpus GPUs"
  torchrun --nproc-per-node "$gpus" python/tests/deep_ep_compat_script.py > "$out/compat.log" 2>&1 || status=1
  tail -5 "$out/compat.log"
  echo "== examples/moe_layer.py on $gpus GPUs"
  python3 examples/moe_layer.py --ranks "$gpus" --cuda > "$out/moe_layer.log" 2>&1 || status=1
  tail -5 "$out/moe_layer.log"
fi
exit $status
