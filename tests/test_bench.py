"""``rmsprop bench --quick`` end to end (a smoke test: speed targets live in the benchmark's
output, never in unit tests)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from rmsprop.cli import main  # noqa: E402
from rmsprop.kernels import cpu  # noqa: E402


@pytest.mark.skipif(not cpu.available(), reason="CPU kernel unavailable")
def test_bench_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--no-progress", "--json",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert "median ms" in text and "%floor" in text and "x foreach" in text
    assert "x Adam" in text and "host µs" in text
    assert "host CPU time per step() of rmsprop fused" in text
    data = json.loads(out.read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["20K", "model50K", "tiny50x64", "momentum20K", "centered20K",
                          "bf16-20K", "fp16-20K", "8bit-20K", "8bit-model50K", "4bit-20K",
                          "4bit-model50K", "8bit-momentum20K"]
    quant = [rows.pop(k) for k in ("8bit-20K", "8bit-momentum20K", "8bit-model50K",
                                   "4bit-20K", "4bit-model50K")]
    assert rows["model50K"]["tensors"] > 100 and rows["tiny50x64"]["tensors"] == 50
    for r in rows.values():
        assert r["floor_gbps"] > 0 and r["stream_copy_gbps"] > 0 and r["stream_triad_gbps"] > 0
        res = {x["candidate"]: x for x in r["results"]}
        assert "skipped" in res["torch.compile"]  # --quick never compiles
        for name in ("rmsprop fused", "rmsprop foreach", "torch foreach=True",
                     "torch foreach=False", "floor"):
            x = res[name]
            assert x["median_ms"] > 0 and x["gbps"] > 0 and x["frac_floor"] > 0, (r["row"], x)
        assert res["torch foreach=True"]["vs_foreach"] == 1.0
        assert res["floor"]["frac_floor"] == pytest.approx(1.0)
        # one round (--quick): the Adam ratio is Adam's median time over the candidate's
        adam = res["torch Adam fused"]
        assert adam["vs_adam_fused"] == 1.0
        for x in res.values():
            if "skipped" in x:
                continue
            assert x["vs_adam_fused"] == pytest.approx(adam["median_ms"] / x["median_ms"])
            # CPU time of the calling thread cannot exceed the wall time of the same calls,
            # up to the per-thread clock's granularity, which under virtualisation and a
            # loaded machine is tens of µs (a unit mistake would be 1000x off)
            assert 0 < x["host_us"] <= 2e3 * x["median_ms"] + 50, (r["row"], x)
    n = 20_000
    single = {x["candidate"]: x for x in rows["20K"]["results"]}
    # bytes the update must move: fp32 p (r+w), g, v (r+w) = 20 B; with momentum 28 B;
    # bf16 params with our float32 state 2+2+2+4+4 = 14 B, torch's bf16 state 10 B
    assert single["rmsprop fused"]["bytes"] == 20 * n
    mom = {x["candidate"]: x for x in rows["momentum20K"]["results"]}
    assert mom["rmsprop fused"]["bytes"] == 28 * n
    bf = {x["candidate"]: x for x in rows["bf16-20K"]["results"]}
    assert bf["rmsprop fused"]["bytes"] == 14 * n
    assert bf["torch foreach=True"]["bytes"] == 10 * n
    # 8-bit state rows: bytes moved per element from the formats (fp32 p r+w, g; one code
    # byte r+w per state element plus a float32 scale per 256 r+w), each step against its own
    # floor, which moves the same arrays without the scales
    for r, streams in zip(quant[:2], (1, 2)):
        res = {x["candidate"]: x for x in r["results"]}
        assert res["rmsprop fused 8bit"]["bytes"] == 12 * n + streams * (2 * n + 8 * -(-n // 256))
        assert res["floor 8bit"]["bytes"] == 12 * n + 2 * streams * n
        assert res["rmsprop fused fp32"]["bytes"] == 12 * n + 8 * streams * n
        for x in res.values():
            assert x["median_ms"] > 0 and x["frac_floor"] > 0
        assert res["floor 8bit"]["frac_floor"] == pytest.approx(1.0)
        assert res["rmsprop fused 8bit"]["vs_fp32"] > 0
        # the arithmetic-only bound: the row's own floor time over the in-cache cost per
        # element spread over the row's threads (a unit slip would be 1e3x off)
        for name, fl in (("rmsprop fused 8bit", "floor 8bit"), ("rmsprop fused fp32",
                                                                "floor fp32")):
            x = res[name]
            assert 0 < x["cache_ns"] < 1e3
            assert x["compute_bound_frac_floor"] == pytest.approx(
                res[fl]["median_ms"] * 1e6 / (x["cache_ns"] * n / x["threads"]))
            assert x["threads"] == data["meta"]["torch_threads"] == 1
    # the default step's host time by tensor count: the plain float32 rows of 1, 50, 147
    hosts = data["host_overhead"]
    assert [(h["tensors"], h["row"]) for h in hosts] == [(1, "20K"), (50, "tiny50x64"),
                                                         (147, "model50K")]
    for h in hosts:
        fused = next(x for x in rows[h["row"]]["results"] if x["candidate"] == "rmsprop fused")
        assert h["host_us"] == fused["host_us"] and h["elements"] == rows[h["row"]]["elements"]
    res4 = {x["candidate"]: x for x in quant[3]["results"]}
    assert res4["rmsprop fused 4bit"]["bytes"] == 12 * n + n + 8 * -(-n // 128)
    # torch's foreach step allocates at least one param-sized temporary (sqrt of v); ours
    # allocates nothing proportional to the model
    assert single["torch foreach=True"]["peak_extra_bytes"] >= 4 * n
    assert single["rmsprop fused"]["peak_extra_bytes"] < 4 * n / 4


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--rows", "nosuchrow", "--quick"]) == 2
    assert "no row matches nosuchrow" in capsys.readouterr().err
    assert main(["bench", "--sizes", "ten"]) == 2
    assert "bad size" in capsys.readouterr().err
    for flag, value, needle in (("--sizes", "nan", "bad size 'nan'"),
                                ("--sizes", "inf", "bad size 'inf'"),
                                ("--sizes", "1e400", "bad size '1e400'"),
                                ("--variant-size", "nan", "bad size 'nan'"),
                                ("--rows", "", "--rows names nothing"),
                                ("--rows", ",", "--rows names nothing"),
                                ("--sizes", "", "--sizes names nothing"),
                                ("--candidates", "", "--candidates names nothing"),
                                ("--candidates", "rmsprop fused graph",
                                 "'rmsprop fused graph' needs --device cuda"),
                                ("--json", "", "--json needs a file name")):
        assert main(["bench", flag, value]) == 2, (flag, value)
        out = capsys.readouterr()
        assert needle in out.err and out.err.count("\n") == 1 and out.out == "", (flag, out)
    assert main(["bench", "--quick", "--candidates", "adam"]) == 2
    assert "unknown candidate" in capsys.readouterr().err
    assert main(["bench", "--list"]) == 0
    assert "model50M" in capsys.readouterr().out
    import torch
    if not torch.cuda.is_available():  # one line, exit code 2, nothing run
        assert main(["bench", "--device", "cuda", "--quick"]) == 2
        err = capsys.readouterr().err
        assert "needs a CUDA device" in err and err.count("\n") == 1
    assert main(["bench", "--device", "tpu"]) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_bench_refuses_an_unwritable_json_path_before_running(tmp_path, capsys):
    """A folder, a missing folder or a read-only file as --json: one line on stderr, exit 2,
    before any row is timed (nothing on stdout, the file untouched)."""
    import os
    ro = tmp_path / "ro.json"
    ro.write_text("keep")
    ro.chmod(0o444)
    cases = [(str(tmp_path), "is a folder"),
             (str(tmp_path / "missing" / "b.json"), "does not exist")]
    if os.geteuid() != 0:  # root writes through permissions
        cases.append((str(ro), "not writable"))
    for path, why in cases:
        assert main(["bench", "--quick", "--no-progress", "--json", path]) == 2
        out, err = capsys.readouterr()
        assert why in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert out == ""
    assert ro.read_text() == "keep"
    assert list(tmp_path.iterdir()) == [ro]


def test_step_share_example_runs_and_reports_every_optimizer():
    """examples/step_share.py (quoted in the README), shrunk: one line per optimizer with
    forward+backward and step times, the step's speed-up over torch foreach=True's, and its
    share of their sum."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "step_share.py"
    out = subprocess.run([sys.executable, str(example), "--width", "32", "--depth", "2",
                          "--batch", "8", "--rounds", "1", "--iters", "2"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    rows = [line for line in out.splitlines() if line.endswith("%")]
    assert [r.split("  ")[0].strip() for r in rows] == [
        "rmsprop (default, checked)", "rmsprop nonfinite='ignore'",
        "torch RMSprop foreach=True", "torch RMSprop (default)"]
    foreach = float(rows[2].split()[-3])
    for r in rows:
        fb, step, ratio, share = (float(x.rstrip("%x")) for x in r.split()[-4:])
        assert fb > 0 and step > 0
        h = 0.005  # the times are printed to 0.01 ms
        lo, hi = 100 * (step - h) / (fb + step + 2 * h), 100 * (step + h) / (fb + step - 2 * h)
        assert lo - 0.05 <= share <= hi + 0.05
        lo, hi = (foreach - h) / (step + h), (foreach + h) / max(step - h, 1e-9)
        assert lo - 0.005 <= ratio <= hi + 0.005, (r, foreach)
    assert float(rows[2].split()[-2].rstrip("x")) == 1.0


def test_host_time_is_the_calling_threads_cpu_time_not_wall_time():
    """``_time_block``'s host column: a call that sleeps costs the thread (almost) no CPU time;
    the CPU time of calls that compute is what the kernel's own account of the thread
    (``getrusage(RUSAGE_THREAD)``) says they used, however long a loaded machine made them
    wait."""
    import resource
    import time

    from rmsprop.cli.bench import _time_block

    def work() -> None:
        x = 0
        for i in range(300_000):
            x += i * i

    host: list[float] = []
    wall = _time_block(lambda: time.sleep(0.02), 3, False, host)
    assert len(host) == 3 and min(wall) >= 0.02 and max(host) < 0.005

    def used() -> float:
        r = resource.getrusage(resource.RUSAGE_THREAD)
        return r.ru_utime + r.ru_stime
    host.clear()
    before = used()
    wall = _time_block(work, 5, False, host)
    total = used() - before
    assert len(host) == 5 and all(0 < h for h in host)
    assert sum(host) == pytest.approx(total, rel=0.1, abs=2e-3)
    assert sum(host) <= 1.05 * sum(wall) + 1e-3


def test_cuda_and_cpu_list_the_same_rows_quantized_ones_included(capsys):
    """Both kernels keep 8-bit and 4-bit state, so --device cuda lists the quantized rows
    that --device cpu does."""
    assert main(["bench", "--device", "cuda", "--list"]) == 0
    cuda_rows = capsys.readouterr().out
    assert main(["bench", "--list"]) == 0
    cpu_rows = capsys.readouterr().out
    assert cuda_rows == cpu_rows
    for name in ("8bit-10M", "4bit-10M", "8bit-model50M", "4bit-model10M", "8bit-momentum10M"):
        assert name in cpu_rows


@pytest.mark.skipif(not cpu.available() or cpu.isa() != "x86-64-v3",
                    reason="needs the CPU kernel's x86-64-v3 build")
def test_arithmetic_bound_times_the_exact_work_and_prints_the_allowance(tmp_path, capsys):
    """``scripts/arithmetic_bound.py``: its divider loop computes NumPy's float32
    ``g / (sqrt(v) + eps)`` bit for bit (so it times the exact work), its codec timing calls
    the kernel's codec (the codes equal ``cpu.quant_encode``'s), and the report's allowance
    is the floor time over the target per element and thread. No timing is asserted."""
    import importlib.util
    from pathlib import Path

    import torch
    path = Path(__file__).resolve().parents[1] / "scripts" / "arithmetic_bound.py"
    spec = importlib.util.spec_from_file_location("arithmetic_bound", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    h = mod.Harness(tmp_path)
    gen = torch.Generator().manual_seed(3)
    v = torch.rand(1029, generator=gen) * torch.logspace(-30, 3, 1029)  # a scalar tail too
    g = torch.randn(1029, generator=gen)
    out = torch.empty(1029)
    assert h.sqrtdiv(v, g, out, 1e-8, 1, 1) > 0
    import numpy as np
    vn, gn = v.numpy(), g.numpy()
    assert np.array_equal(out.numpy(), gn / (np.sqrt(vn) + np.float32(1e-8)))
    x = torch.rand(512, generator=gen)
    for fmt in ("u8", "s4"):
        ns, codes, scales = h.codec_ns(fmt, True, x, 1, 1)
        want_codes, want_scales = cpu.quant_encode(x, fmt)
        assert ns > 0 and torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    assert mod.main(["--elements", "512", "--rounds", "1", "--calls", "1", "--numel", "4096",
                     "--repeats", "3", "--target", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  exact sqrt + division")
    assert [ln.split(":")[0].strip() for ln in lines[2:6]] == [
        "u8 codec", "s8 codec", "u4 codec", "s4 codec"]
    head = lines[6]
    floor_ms = float(head.split("floor ")[1].split(" ms")[0])
    allowed = float(head.split("allows ")[1].split()[0])
    threads = torch.get_num_threads()
    assert allowed == pytest.approx(floor_ms * 1e6 * threads / 4096 / 0.5, rel=2e-3)


def test_bench_refuses_conflicting_options_before_running(tmp_path, capsys):
    """What --json records as the command must be what ran: --quick's one round and no
    compile do not silently override --repeats or --compile-all."""
    out = tmp_path / "q.json"
    for args, needle in ((["--quick", "--repeats", "5"], "--quick runs 1 round without "
                                                         "torch.compile; drop --repeats"),
                         (["--quick", "--compile-all"], "drop --compile-all or --quick"),
                         (["--compile-all", "--no-compile"], "--compile-all and --no-compile "
                                                             "contradict each other")):
        assert main(["bench", *args, "--no-progress", "--json", str(out)]) == 2, args
        o, err = capsys.readouterr()
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert o == ""
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not cpu.available(), reason=cpu.unavailable_reason())
def test_kernel_ab_builds_the_tree_it_names_and_reports_each_build(capsys):
    """``scripts/kernel_ab.py``: a build of the working tree's sources steps exactly as the
    loaded kernel does (same params, codes and scales), and the report has one line per
    build. No timing is asserted."""
    import importlib.util
    import tempfile
    from pathlib import Path

    import torch

    from rmsprop import codecs
    path = Path(__file__).resolve().parents[1] / "scripts" / "kernel_ab.py"
    spec = importlib.util.spec_from_file_location("kernel_ab", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    loaded = cpu._need()
    gen = torch.Generator().manual_seed(5)
    n = 3 * 256 + 40
    p0, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    v0, s0 = cpu.quant_encode(torch.rand(n, generator=gen), codecs.QUANTIZED["8bit"]["square_avg"])
    kw = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
              maximize=False, eps_in_sqrt=False, lr_in_momentum=False, nesterov=False,
              decoupled_weight_decay=False, bias_correction=1.0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        built = mod.build("WORKTREE", Path(tmp))
        try:
            for lib in (loaded, built):
                cpu._lib = lib
                p, v, s = p0.clone(), v0.clone(), s0.clone()
                cpu.fused_step_quantized([p], [g], [v], None, None, square_avg_scales=[s],
                                         state_dtype="8bit", **kw)
                out.append((p, v, s))
        finally:
            cpu._lib = loaded
    assert all(torch.equal(a, b) for a, b in zip(*out))
    assert not torch.equal(out[0][0], p0)  # the step did move the params
    try:
        assert mod.main(["WORKTREE", "--rounds", "1", "--numel", "200K"]) == 0
    finally:
        cpu._lib = loaded
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("kernel_ab: 8bit state, 200,000 elements, 1 interleaved")
    assert len(lines) == 2 and lines[1].split()[0] == "WORKTREE"
