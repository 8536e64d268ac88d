#!/usr/bin/env bash
# The CUDA check (README, "On a GPU"): one command on a machine with a CUDA GPU, each part
# under its own timeout (seconds, overridable), its log in $OUT (default /tmp/gpu-check):
#   tests       tests.log       the kernel tests compiled on CUDA (TESTS_TIMEOUT=120; over
#                               TEST_WORKERS=6 pytest-xdist workers where installed)
#   sync        sync.log        scripts/gpu_sync_check.py: syncs per step of each configuration,
#                               CUDA-graph replay vs eager, the deferred error (SYNC_TIMEOUT=60)
#   bench       bench.log       rmsprop bench --device cuda, host CPU time per step included;
#                               bench_cuda.json (BENCH_TIMEOUT=165; BENCH_ARGS adds options)
#   host        host.log        scripts/host_overhead.py --device cuda: host CPU time of a cached
#                               step with real launches, 1/147/1000 tensors (HOST_TIMEOUT=30)
#   host-graph  host.log        the same with --cuda-graph (the step as one CUDA graph)
#   compile     compile.log     scripts/gpu_compile_check.py: a training step under
#                               torch.compile, ours against torch's, both modes (COMPILE_TIMEOUT=90)
#   share*      step_share.log  examples/step_share.py --device cuda at 3.4M, 9.9M and 118.6M
#                               params (STEP_SHARE_TIMEOUT=15 each)
# The timeouts add up to 9 minutes. summary.txt: each part's exit status (124: timed out) and
# seconds; the exit status is the number of parts that failed (0: all passed).
# Uses the python3 that holds torch+triton there (PYTHON overrides); the package runs from
# src/ (no install).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"
fails=0

part() {  # part NAME TIMEOUT LOG COMMAND...: run, append to LOG, record the exit status
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc from
  shift 3
  echo "== $name: $*" >> "$OUT/$log"
  from=$(wc -l < "$OUT/$log")
  # into the file, not through a pipe: a child the timeout leaves behind (a compile worker)
  # holding the pipe open would keep the part from ending
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  tail -n +"$from" "$OUT/$log"
  [ "$rc" -eq 0 ] || fails=$((fails + 1))
  printf '%-11s rc=%-3s %4ss  %s%s\n' "$name" "$rc" "$((SECONDS - t0))" "$log" \
    "$([ "$rc" -eq 124 ] && echo " (timed out after ${limit}s)")" >> "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; } 2>&1 | tee "$OUT/gpu.txt"

# the compiled (CUDA) half of the kernel tests; the interpreted half runs in CI
tests=(tests/test_triton.py)
for f in tests/test_triton_quant.py tests/test_device_step.py; do [ -f "$f" ] && tests+=("$f"); done
# the compiles dominate: spread them over pytest-xdist workers where it is installed
workers=()
"$PY" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-6}")
part tests "${TESTS_TIMEOUT:-120}" tests.log \
  "$PY" -m pytest "${tests[@]}" "${workers[@]}" -q -p no:cacheprovider -k "not interpreter"
part sync "${SYNC_TIMEOUT:-60}" sync.log "$PY" scripts/gpu_sync_check.py
# shellcheck disable=SC2086  # BENCH_ARGS: words on purpose
part bench "${BENCH_TIMEOUT:-165}" bench.log \
  "$PY" -m rmsprop.cli bench --device cuda --no-progress --json "$OUT/bench_cuda.json" \
  ${BENCH_ARGS:-}
part host "${HOST_TIMEOUT:-30}" host.log \
  "$PY" scripts/host_overhead.py --device cuda --calls 300 --repeats 2
part host-graph "${HOST_TIMEOUT:-30}" host.log \
  "$PY" scripts/host_overhead.py --device cuda --calls 300 --repeats 2 --cuda-graph
part compile "${COMPILE_TIMEOUT:-90}" compile.log "$PY" scripts/gpu_compile_check.py
for size in "3.4M:--width 1024 --depth 4 --batch 64" "9.9M:" \
            "118.6M:--width 4096 --depth 8 --batch 1024"; do
  # shellcheck disable=SC2086  # the model's options: words on purpose
  part "share${size%%:*}" "${STEP_SHARE_TIMEOUT:-15}" step_share.log \
    "$PY" examples/step_share.py --device cuda ${size#*:}
done

{ echo "== summary ($fails failed)"
  cat "$OUT/summary.txt"
  grep -h "checks passed" "$OUT/sync.log"
  sed -n '/^== host CPU time per step()/,/^$/p' "$OUT/bench.log"; } | tee "$OUT/summary.log"
exit "$fails"
