"""The GPU check's scripts, where a CPU can run them: ``scripts/gpu-check.sh`` parses and runs
every part under its timeout (with a stand-in python), ``scripts/gpu_sync_check.py --device
cpu`` checks the eager steps against the NumPy spec and the non-finite error, and fails when a
step goes wrong; ``scripts/gpu_compile_check.py cpu`` traces a training step."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_parses_and_runs_every_part_recording_each_exit_status(tmp_path):
    """With a stand-in for python3 (it echoes its arguments; the test part sleeps past its
    timeout, one step_share size fails): every part runs in order, its exit status and log
    land in summary.txt, and the script exits with the number of failed parts."""
    script = SCRIPTS / "gpu-check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    fake = tmp_path / "python3"
    fake.write_text("#!/usr/bin/env bash\n"
                    'echo "ran: $*"\n'
                    'case "$*" in "-m pytest "*) sleep 30;; *"--width 4096"*) exit 3;; esac\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "TESTS_TIMEOUT": "1"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the tests' timeout, one size
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [
        ["tests", "rc=124"], ["sync", "rc=0"], ["bench", "rc=0"], ["host", "rc=0"],
        ["host-graph", "rc=0"], ["compile", "rc=0"], ["share3.4M", "rc=0"], ["share9.9M", "rc=0"],
        ["share118.6M", "rc=3"]]
    assert "timed out after 1s" in summary[0]
    ran = {log: (out / log).read_text() for log in ("sync.log", "bench.log", "host.log",
                                                     "compile.log", "step_share.log")}
    assert "ran: scripts/host_overhead.py --device cuda" in ran["host.log"]
    assert "--repeats 2 --cuda-graph" in ran["host.log"]
    assert "ran: scripts/gpu_sync_check.py" in ran["sync.log"]
    assert f"ran: -m rmsprop.cli bench --device cuda --no-progress --json " \
           f"{out / 'bench_cuda.json'}" in ran["bench.log"]
    assert "ran: scripts/gpu_compile_check.py" in ran["compile.log"]
    assert ran["step_share.log"].count("ran: examples/step_share.py --device cuda") == 3
    assert "--width 1024 --depth 4 --batch 64" in ran["step_share.log"]
    for name in ("scripts/gpu_sync_check.py", "scripts/gpu_compile_check.py",
                 "scripts/host_overhead.py", "examples/step_share.py", "tests/test_triton.py",
                 "tests/test_triton_quant.py"):
        assert (ROOT / name).exists() and name in script.read_text()


def test_sync_check_cpu_mode_passes(capsys):
    """Every configuration's eager steps equal the NumPy spec's, the statistics match it, and
    the non-finite error names the parameter and changes nothing."""
    mod = _load("gpu_sync_check")
    code = mod.main(["--device", "cpu"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert code == 0, out
    for name in mod.CONFIGS:
        assert any(line.startswith(f"{name}: eager OK") for line in lines), (name, out)
    assert any(line.startswith("deferred error") for line in lines), out
    assert "FAILED" not in out


def test_sync_check_fails_when_a_step_goes_wrong(capsys, monkeypatch):
    """The check is not a formality: an optimizer whose every fourth step() does nothing and
    whose errors say nothing fails every configuration, and the script exits 1."""
    mod = _load("gpu_sync_check")

    class Lossy(mod.RMSprop):
        calls = 0

        def step(self, closure=None):  # type: ignore[override]
            Lossy.calls += 1
            if Lossy.calls % 4 == 0:
                return None
            try:
                return super().step(closure)
            except mod.NonFiniteGradientError:
                raise mod.NonFiniteGradientError("non-finite gradient") from None

    monkeypatch.setattr(mod, "RMSprop", Lossy)
    assert mod.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    for name in mod.CONFIGS:
        assert f"{name}: FAILED" in out, (name, out)
    assert "deferred error: FAILED" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_sync_check_without_cuda_says_so_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_sync_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.count("\n") == 1 and "needs a CUDA device" in proc.stderr


@pytest.mark.slow
def test_compile_check_cpu_mode_traces_a_training_step():
    """dynamo's tracing of a whole training step (forward, backward, ours and torch's step)
    without code generation: each candidate runs and agrees with its eager run."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_compile_check.py"), "cpu",
                           "--steps", "3", "--backend", "eager", "--modes", "default",
                           "--only", "ours,torch"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("default")]
    assert [r[1] for r in rows] == ["ours", "torch"]
    for r in rows:
        err = float(r[-1])
        assert err < 1e-4, r  # lr 1e-3, 3 steps: a wrong step moves params by ~1e-3


def test_host_overhead_cpu_mode_runs_and_prints(capsys):
    """``scripts/host_overhead.py --device cpu``: the timed steps take the cached device plan
    (the script raises otherwise) and a row per size and the ratio line are printed; the
    stubs are removed afterwards. No timing is asserted."""
    pytest.importorskip("triton")
    mod = _load("host_overhead")
    from rmsprop.kernels import triton as tk
    kernel = tk._rmsprop_kernel
    assert mod.main(["--device", "cpu", "--counts", "1,3", "--calls", "3",
                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "Triton launches stubbed out" in out[0]
    rows = [line.split() for line in out[2:4]]
    assert [r[0] for r in rows] == ["1", "3"] and all(float(x) > 0 for r in rows for x in r[1:])
    assert any(line.startswith("new grads: ratio 3/1 = ") for line in out)
    assert out[-1].startswith("per-tensor floor of any step that reads every gradient")
    assert tk._rmsprop_kernel is kernel
