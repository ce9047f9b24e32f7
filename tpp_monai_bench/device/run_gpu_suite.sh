#!/usr/bin/env bash
# On the GPU machine, from the repository root (the device tool's working copy, `wheels/` carried): install the
# carried wheels, run the GPU suite, and leave its JSON and log in $OUT (or tpp_monai_bench/results/ without $OUT).
set -uo pipefail
python -m pip install --no-index --no-deps --quiet wheels/*.whl || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-tpp_monai_bench/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python -m tpp_monai bench --suite gpu --device cuda --out "$out/gpu_suite_cuda.json" 2>&1 | tee "$out/gpu_suite_cuda.log"
