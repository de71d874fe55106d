#!/usr/bin/env bash
# The Python suites on a GPU machine, in one go: builds and installs epcomm with its CUDA backend,
# then runs every test in the CUDA worlds the visible GPUs allow (2, 4, 8 ranks) plus the CPU worlds,
# and the MoE example on all GPUs. Needs torch, pybind11, scikit-build-core, pytest and
# nvidia-nvshmem-cu13 installed (no network is used: --no-build-isolation).
#   EPCOMM_TEST_WORLDS=cuda2,cuda8 python/tests/run_gpu.sh   # only some worlds
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python3 -m pip install -q --no-build-isolation -C build-dir=build/python-gpu .
python3 -c "import epcomm; assert epcomm.Buffer.is_sm90_compiled(), 'epcomm was built without sm_90 kernels'"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "== pytest (GPUs visible: $gpus)"
python3 -m pytest python/tests -q -rs --durations=15
echo "== examples/moe_layer.py on $gpus GPUs"
python3 examples/moe_layer.py --ranks "$gpus" --cuda
