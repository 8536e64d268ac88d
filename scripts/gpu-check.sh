#!/usr/bin/env bash
# The CUDA check of the Triton path, as run on a lent GPU machine (see README, "GPU"):
# the kernel tests compiled on CUDA (and interpreted), then `rmsprop bench --device cuda`.
# Uses the python3 that holds torch+triton there; the package runs from src/ (no install).
# Results land in $OUT (default /tmp/gpu-check): gpu.txt, tests.log, bench.log, bench_cuda.json.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/test_triton.py -q -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-300}" python3 -m rmsprop.cli bench --device cuda --no-progress \
  --json "$OUT/bench_cuda.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
