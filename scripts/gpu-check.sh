#!/usr/bin/env bash
# The CUDA check of the Triton path, on a machine with a CUDA GPU (README, "On a GPU"):
# the kernel tests compiled on CUDA, then `rmsprop bench --device cuda`.
# Uses the python3 that holds torch+triton there; the package runs from src/ (no install).
# Results land in $OUT (default /tmp/gpu-check): gpu.txt, tests.log, bench.log, bench_cuda.json,
# compile.log (a training step under torch.compile, ours against torch's, both modes).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
# the compiled (CUDA) half: the interpreted half runs in CI, whose Triton (3.9) interprets
# the chunk loop's runtime bounds; older interpreters (3.6) do not
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/test_triton.py -q -p no:cacheprovider \
  -k "not interpreter" 2>&1 | tee "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-300}" python3 -m rmsprop.cli bench --device cuda --no-progress \
  --json "$OUT/bench_cuda.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
timeout "${COMPILE_TIMEOUT:-240}" python3 scripts/gpu_compile_check.py 2>&1 \
  | grep -E "^(default|reduce-overhead) " | tee "$OUT/compile.log"
