"""Host syncs of the CUDA step, its CUDA-graph capture and the deferred non-finite error.

    python scripts/gpu_sync_check.py                 # on CUDA (part of scripts/gpu-check.sh)
    python scripts/gpu_sync_check.py --device cpu    # the parts that apply on the CPU

Each configuration (``nonfinite`` raise/skip/ignore/raise_now, a ``GradScaler``, a tensor
``lr`` written by a scheduler, ``bias_correction``, ``track_stats``, ``capturable``,
``cuda_graph``) steps three float32 params of a few thousand elements: two warm-up steps (the
plan is built and cached; with ``cuda_graph`` a third, which captures the graph), then three
steps under ``torch.cuda.set_sync_debug_mode("warn")`` whose synchronizing calls
are counted, two under ``"error"``, and two queued behind a 20 ms GPU sleep, timed on the
host: ``step()`` calls that return long before the sleep ends did not wait for the GPU
(which also catches waits the debug mode does not see, such as an event synchronize; the
second step would wait for the first one's verdict if a step waited for the last step's).
Every configuration's params after its last step are compared with :func:`rmsprop.spec.step`
run on the same gradients (NumPy, float32). One line each: ``config: N syncs / OK``;
``raise_now`` reads the verdict on the host at each step, so its syncs are expected.

Then ``opt.step()`` captured with ``torch.cuda.graph`` (``capturable=True``, with
``bias_correction`` so the device step count enters the math) and replayed, against the same
steps run eagerly: ``max|replay - eager|`` must be 0 (the same kernel, bit for bit). Last, the
deferred error: on CUDA a non-finite gradient under ``nonfinite="raise"`` makes ``step()``
return without a sync, and the error arrives at the next ``step()`` once the verdict has
reached host memory (or at ``opt.check()``, which waits for it), naming the parameter and
the step, with nothing changed by the bad step; ``raise_now`` raises in the bad ``step()``
itself.

On the CPU there is no sync to count and no CUDA graph: the eager results, the statistics and
the non-finite error (which there may arrive at the bad step itself) are checked. Exit status
1 if anything failed, an API it needs being absent included.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmsprop import spec
from rmsprop.options import Options
from rmsprop.torch import RMSprop
from rmsprop.torch.optimizer import NonFiniteGradientError

NAMES = ("layer0.weight", "layer1.weight", "layer2.bias")
SHAPES = ((64, 33), (4096,), (257,))
LR, EPS, ALPHA = 1e-2, 1e-3, 0.99  # eps of the grads' order, so an unscaled grad shows
WARMUP, COUNTED, STRICT = 2, 3, 2
BEHIND = 2  # the last steps, queued behind the GPU sleep
STEPS = WARMUP + COUNTED + STRICT + BEHIND
SCALE = 1024.0  # GradScaler's scale: a power of two, so grad * scale / scale is exact
DECAY = 0.9  # the scheduler's lr factor per step
SLEEP_MS = 20.0  # GPU work queued before the timed step: a step that waits for it is a sync


class Failure(Exception):
    """A check that did not hold (the message says which)."""


def initial_params() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def gradients(steps: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(1)
    return [[(1e-2 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]
            for _ in range(steps)]


def scheduled_lr(k: int) -> float:
    """The lr of step ``k`` (0-based) that ``LambdaLR(lambda e: DECAY ** e)`` writes into a
    float32 tensor lr: ``float32(lr) * DECAY**k`` in float32 arithmetic."""
    return float(np.float32(LR) * np.float32(DECAY ** k))


def reference(p0: list[np.ndarray], grads: list[list[np.ndarray]], opts: dict[str, Any],
              lrs: list[float] | None = None) -> list[list[np.ndarray]]:
    """The params after each step by the NumPy spec: ``out[k]`` after step ``k + 1``."""
    ps = [p.copy() for p in p0]
    states = [spec.init_state(p, Options(lr=LR, eps=EPS, alpha=ALPHA, **opts)) for p in ps]
    out = []
    for k, gs in enumerate(grads):
        o = Options(lr=LR if lrs is None else lrs[k], eps=EPS, alpha=ALPHA, **opts)
        for i, g in enumerate(gs):
            ps[i], states[i] = spec.step(ps[i], g, states[i], o)
        out.append([p.copy() for p in ps])
    return out


def max_diff(got: list[torch.Tensor], want: list[np.ndarray]) -> float:
    return max(float(np.abs(g.detach().cpu().numpy() - w).max()) for g, w in zip(got, want))


def close(got: list[torch.Tensor], want: list[np.ndarray], what: str) -> float:
    """max|got - want|; a Failure past float32 rounding of eight steps (an extra, missing or
    mis-scaled step moves params by ~lr)."""
    d = max_diff(got, want)
    tol = 1e-6 * (1 + max(float(np.abs(w).max()) for w in want))
    if not d <= tol:  # NaN fails too
        raise Failure(f"{what}: max|step - spec| {d:.3e} > {tol:.1e}")
    return d


class Setup:
    """Params (leaf tensors with ``.grad`` allocated once, so a CUDA graph can read them),
    their optimizer, and how one step is driven."""

    def __init__(self, dev: torch.device, kwargs: dict[str, Any], driver: str = "plain"
                 ) -> None:
        self.dev, self.driver = dev, driver
        self.params = [torch.tensor(p, device=dev, requires_grad=True)
                       for p in initial_params()]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        lr: Any = torch.tensor(LR, device=dev) if driver == "sched" else LR
        self.opt = RMSprop(list(zip(NAMES, self.params)), lr=lr, eps=EPS, alpha=ALPHA,
                           **kwargs)
        self.scaler = torch.amp.GradScaler(dev.type, init_scale=SCALE, growth_interval=10 ** 6) \
            if driver == "scaler" else None
        self.zero = torch.zeros((), device=dev)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda e: DECAY ** e) \
            if driver == "sched" else None

    def set_grads(self, gs: list[torch.Tensor]) -> None:
        if self.scaler is not None:
            self.scaler.scale(self.zero)  # as scaler.scale(loss).backward() would
        for p, g in zip(self.params, gs):
            assert p.grad is not None
            # device-to-device copies into the same .grad tensors (what a CUDA graph reads)
            p.grad.copy_(g * SCALE if self.scaler is not None else g)

    def step(self, gs: list[torch.Tensor]) -> None:
        self.set_grads(gs)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.sched is not None:
            self.sched.step()


#: name -> (optimizer kwargs, driver, syncs expected)
CONFIGS: dict[str, tuple[dict[str, Any], str, bool]] = {
    "nonfinite='raise' (default)": ({}, "plain", False),
    "nonfinite='skip'": ({"nonfinite": "skip"}, "plain", False),
    "nonfinite='ignore'": ({"nonfinite": "ignore"}, "plain", False),
    "nonfinite='raise_now'": ({"nonfinite": "raise_now"}, "plain", True),
    "GradScaler": ({}, "scaler", False),
    "tensor lr + LambdaLR": ({}, "sched", False),
    "bias_correction": ({"bias_correction": True}, "plain", False),
    "track_stats": ({"track_stats": True}, "plain", False),
    "capturable": ({"capturable": True}, "plain", False),
    "cuda_graph": ({"cuda_graph": True, "bias_correction": True}, "plain", False),
    "cuda_graph + tensor lr + LambdaLR": ({"cuda_graph": True}, "sched", False),
}
RULE = ("bias_correction",)  # the configs' kwargs that are options of the rule (the spec's)


@contextmanager
def sync_mode(dev: torch.device, mode: str) -> Iterator[list[warnings.WarningMessage]]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block, recording its warnings."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(mode)
        try:
            yield seen
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


#: What torch's sync debug mode says of a synchronizing call. (Enabling the mode also warns,
#: once per process, that it "does not yet detect all synchronizing operations": that
#: notice is not a sync.)
SYNC_MESSAGE = "called a synchronizing CUDA operation"


def syncs(seen: list[warnings.WarningMessage]) -> int:
    return sum(SYNC_MESSAGE in str(w.message) for w in seen)


def sleep_cycles(dev: torch.device, ms: float) -> int:
    """GPU clock cycles of ``torch.cuda._sleep`` lasting about ``ms`` milliseconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    for _ in range(2):  # the first one also pays the clock's ramp-up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
    return int(cycles * ms / max(start.elapsed_time(end), 1e-3))


def check_config(dev: torch.device, name: str, cycles: int) -> str:
    kwargs, driver, expect_sync = CONFIGS[name]
    # cuda_graph captures at the route's second step (the capture waits for the device)
    warm = WARMUP + (1 if kwargs.get("cuda_graph") else 0)
    grads = gradients(STEPS - WARMUP + warm)
    gdev = [[torch.tensor(g, device=dev) for g in gs] for gs in grads]
    s = Setup(dev, kwargs, driver)
    for k in range(warm):
        s.step(gdev[k])
    k = warm
    with sync_mode(dev, "warn") as seen:
        for _ in range(COUNTED):
            s.step(gdev[k])
            k += 1
    n = syncs(seen)
    if n and not expect_sync:
        # where: the Python line that made the synchronizing call (ours, or torch's own)
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in seen
                        if SYNC_MESSAGE in str(w.message)})
        raise Failure(f"{n} syncs in {COUNTED} steps under set_sync_debug_mode('warn'), "
                      f"from {', '.join(where)}")
    if dev.type == "cuda" and not expect_sync:
        with sync_mode(dev, "error"):
            for _ in range(STRICT):
                try:
                    s.step(gdev[k])
                except RuntimeError as e:
                    if SYNC_MESSAGE in str(e):
                        raise Failure(f"a step synced under set_sync_debug_mode('error'): "
                                      f"{e}") from None
                    raise
                k += 1
    else:
        for _ in range(STRICT):
            s.step(gdev[k])
            k += 1
    behind = ""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)  # the steps are queued behind SLEEP_MS of GPU work
        t0 = time.perf_counter()
        for _ in range(BEHIND):
            s.step(gdev[k])
            k += 1
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        behind = (f"; {BEHIND} step() calls {host * 1e3:.2f} ms behind a {SLEEP_MS:g} ms "
                  "GPU sleep")
        if host > SLEEP_MS / 2e3 and not expect_sync:
            raise Failure(f"step() waited for the GPU: {BEHIND} steps took {host * 1e3:.1f} "
                          f"ms behind a {SLEEP_MS:g} ms GPU sleep, with no sync the debug "
                          "mode sees")
    else:
        for _ in range(BEHIND):
            s.step(gdev[k])
            k += 1
    opts = {key: v for key, v in kwargs.items() if key in RULE}
    lrs = [scheduled_lr(j) for j in range(len(grads))] if driver == "sched" else None
    want = reference(initial_params(), grads, opts, lrs)
    d = close(s.params, want[-1], name)
    extra = ""
    if kwargs.get("track_stats"):
        g = s.opt.stats()["groups"][0]
        change = np.concatenate([(a - b).ravel() for a, b in zip(want[-1], want[-2])])
        rms = float(np.sqrt(np.mean(change.astype(np.float64) ** 2)))
        if int(g["step"]) != STEPS or not abs(g["update_rms"] - rms) <= 1e-3 * rms:
            raise Failure(f"stats(): step {g['step']} (want {STEPS}), update_rms "
                          f"{g['update_rms']:.6e} (the spec's last change: {rms:.6e})")
        extra = f"; stats() step {int(g['step'])}, update_rms as the spec's"
    what = f"(max|step - spec| {d:.1e}{behind}{extra})"
    if dev.type != "cuda":
        return f"{name}: eager OK {what}"
    if expect_sync:
        return f"{name}: {n} syncs / expected (it reads the verdict on the host) {what}"
    return f"{name}: 0 syncs / OK {what}"


def check_capture(dev: torch.device) -> str:
    """``capturable=True``: one ``opt.step()`` captured after warm-up on a side stream (as
    torch's CUDA-graph recipe does), replayed; against the same steps run eagerly."""
    kwargs = {"capturable": True, "bias_correction": True}
    replays = 5
    grads = gradients(3 + replays)
    gdev = [[torch.tensor(g, device=dev) for g in gs] for gs in grads]
    eager, graphed = Setup(dev, kwargs), Setup(dev, kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(3):
            graphed.step(gdev[k])
    torch.cuda.current_stream().wait_stream(side)
    for k in range(3):
        eager.step(gdev[k])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.opt.step()
    for k in range(3, 3 + replays):
        graphed.set_grads(gdev[k])
        graph.replay()
        eager.step(gdev[k])
    torch.cuda.synchronize()
    d = max(float((a - b).abs().max()) for a, b in zip(eager.params, graphed.params))
    for p_e, p_g in zip(eager.params, graphed.params):
        for key, v in eager.opt.state[p_e].items():
            w = graphed.opt.state[p_g][key]
            if torch.is_tensor(v):
                d = max(d, float((v.double() - w.double()).abs().max()))
    if d != 0:
        raise Failure(f"replay differs from eager: max|diff| {d:.3e} (params and state)")
    ref = close(graphed.params, reference(initial_params(), grads,
                                          {"bias_correction": True})[-1], "capture")
    return (f"capture (capturable=True, bias_correction): {replays} replays vs eager: "
            f"max|diff| 0 (params and state); max|replay - spec| {ref:.1e}")


def bad_grads(dev: torch.device, gs: list[np.ndarray]) -> list[torch.Tensor]:
    out = [torch.tensor(g, device=dev) for g in gs]
    out[1][5] = float("nan")
    return out


def snapshot(s: Setup) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in s.params]
    for p in s.params:
        out += [v.clone() for v in s.opt.state[p].values() if torch.is_tensor(v)]
    return out


def unchanged(before: list[torch.Tensor], s: Setup) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, snapshot(s)))


def names_it(e: Exception, step: int | None) -> bool:
    """The error names the parameter holding the NaN, and the step it happened at (``step``;
    ``None`` for an error raised by that very step)."""
    msg = str(e)
    return NAMES[1] in msg and (step is None or re.search(
        rf"\bstep\b\D{{0,24}}\b{step}\b", msg) is not None)


def check_deferred(dev: torch.device) -> str:
    """``nonfinite="raise"``: the bad step changes nothing; on CUDA it returns (no sync) and
    the error arrives at the next ``step()`` once the verdict has arrived (the check waits for
    the device first, as a training loop's forward and backward would), or at
    ``opt.check()``; the raising call changes
    nothing either, and the optimizer then steps on as if the bad step never happened. With
    ``bias_correction`` a wrongly counted step would show in the params."""
    cuda = dev.type == "cuda"
    grads = gradients(WARMUP + 1)
    gdev = [[torch.tensor(g, device=dev) for g in gs] for gs in grads]
    bad_at = WARMUP + 1  # the step() call holding the NaN
    kwargs = {"bias_correction": True}
    arrivals = []
    def at_bad_step(options: dict) -> tuple[Setup, list[torch.Tensor]]:
        """A run WARMUP finite steps in with the NaN gradient set, and its snapshot."""
        s = Setup(dev, options)
        for k in range(WARMUP):
            s.step(gdev[k])
        before = snapshot(s)
        s.set_grads(bad_grads(dev, grads[WARMUP]))
        return s, before

    for reader in ("step", "check"):
        s, before = at_bad_step(kwargs)
        if not hasattr(s.opt, "check"):
            raise Failure("RMSprop.check() is missing (the deferred error's explicit read)")
        try:
            s.opt.step()
            where = None
        except NonFiniteGradientError as e:
            if cuda:
                raise Failure("nonfinite='raise' raised inside the bad step() on CUDA: it "
                              "read the verdict on the host (a sync)") from None
            where, err = "the bad step() itself", e
        if where is None:
            if not unchanged(before, s):
                raise Failure("the bad step changed params or state")
            try:
                if reader == "step":
                    if cuda:  # step() raises a verdict once it has arrived, never waiting:
                        torch.cuda.synchronize()  # as a loop's forward and backward let it
                    s.step(gdev[WARMUP])  # finite grads: must raise, not apply them
                else:
                    s.opt.check()
            except NonFiniteGradientError as e:
                where, err = f"the next {reader}()", e
            else:
                raise Failure(f"no NonFiniteGradientError at the next {reader}() after a NaN "
                              "gradient under nonfinite='raise'")
        deferred = where != "the bad step() itself"
        if not names_it(err, bad_at if deferred else None):
            raise Failure(f"the error does not name {NAMES[1]!r}"
                          + (f" and step {bad_at}" if deferred else "") + f": {err}")
        if not unchanged(before, s):
            raise Failure(f"the bad step or the raising {reader}() changed params or state")
        try:
            s.opt.check()
        except NonFiniteGradientError as e:
            raise Failure(f"opt.check() raised the error again after {where}: {e}") from None
        s.step(gdev[WARMUP])  # on as if the bad step never happened
        close(s.params, reference(initial_params(), grads, kwargs)[-1], "after the error")
        arrivals.append(f"raised by {where}")
    s, before = at_bad_step({"nonfinite": "raise_now"})
    try:
        s.opt.step()
    except NonFiniteGradientError as e:
        if NAMES[1] not in str(e) or not unchanged(before, s):
            raise Failure(f"raise_now: the error does not name {NAMES[1]!r} or the step "
                          f"changed something: {e}") from None
    else:
        raise Failure("nonfinite='raise_now' did not raise in the bad step()")
    return (f"deferred error (nonfinite='raise', NaN in {NAMES[1]} at step {bad_at}): "
            f"{' / '.join(dict.fromkeys(arrivals))}; named, nothing changed, raised once, "
            "later steps as the spec's; raise_now raised in the bad step()")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sync_check: --device cuda needs a CUDA device (torch sees none); "
              "--device cpu runs the CPU part", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cycles = sleep_cycles(dev, SLEEP_MS) if dev.type == "cuda" else 0
    checks: list[tuple[str, Callable[[], str]]] = [
        (name, partial(check_config, dev, name, cycles)) for name in CONFIGS]
    if dev.type == "cuda":
        checks.append(("capture", partial(check_capture, dev)))
    checks.append(("deferred error", partial(check_deferred, dev)))
    failed = 0
    for name, fn in checks:
        try:
            print(fn(), flush=True)
        except Exception as e:  # noqa: BLE001 - report each check, go on to the next
            failed += 1
            kind = "" if isinstance(e, Failure) else f"{type(e).__name__}: "
            print(f"{name}: FAILED: {kind}{str(e).splitlines()[0] if str(e) else ''}"[:400],
                  flush=True)
            if args.verbose:
                traceback.print_exc()
    if dev.type != "cuda":
        print("capture: not run (CUDA graphs need CUDA); syncs: not counted on the CPU")
    print(f"gpu_sync_check --device {dev.type}: {len(checks) - failed} of {len(checks)} "
          f"checks passed" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
