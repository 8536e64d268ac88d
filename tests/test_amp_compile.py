"""rmsprop.torch.RMSprop with mixed precision (torch.autocast + torch.amp.GradScaler) and with
torch.compile. Oracles: torch.optim.RMSprop run through the same autocast/scaler/compile
harness (same options, so the same trajectory and the same skipped steps), and our own eager
run for "compiled equals eager"."""

from __future__ import annotations

import copy
import logging
import os
import time

import pytest

torch = pytest.importorskip("torch")

from conftest import ALL_PATHS  # noqa: E402
from rmsprop.torch import RMSprop  # noqa: E402

# the shared table (tests/conftest.py), with the default choice for "fused": fused=None takes
# the fused kernel wherever it applies, and foreach under torch.compile
PATHS = {**ALL_PATHS, "fused": dict(fused=None)}
OPTS = dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.01)
STEPS = 6
OVERFLOW_AT = 2  # this step's scaled gradient gets an inf: the scaler must skip it


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def data(t: int):
    g = torch.Generator().manual_seed(10 + t)
    return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)


def amp_run(make_opt, *, clip: bool):
    """Train with bf16 autocast and a GradScaler; step OVERFLOW_AT gets an inf gradient."""
    model = make_model()
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    scales, skipped = [], []
    for t in range(STEPS):
        x, y = data(t)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if t == OVERFLOW_AT:
            model[0].weight.grad[0, 0] = float("inf")
        if clip:  # the documented recipe for clipping: unscale first, then clip, then step
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        skipped.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
        scaler.update()
        scales.append(float(scaler.get_scale()))
    return model, opt, scales, skipped


@pytest.mark.parametrize("clip", [False, True], ids=["scaler", "unscale-clip"])
@pytest.mark.parametrize("path", list(PATHS))
def test_grad_scaler_skips_overflow_and_matches_torch(path, clip):
    ours, opt, scales, skipped = amp_run(lambda ps: RMSprop(ps, **OPTS, **PATHS[path]),
                                         clip=clip)
    ref, ref_opt, ref_scales, ref_skipped = amp_run(
        lambda ps: torch.optim.RMSprop(ps, **OPTS, foreach=False), clip=clip)
    # the overflowed step is skipped (and nonfinite="raise", the default, did not fire)
    assert skipped == ref_skipped == [t == OVERFLOW_AT for t in range(STEPS)]
    assert scales == ref_scales and scales[OVERFLOW_AT] < scales[OVERFLOW_AT - 1]
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert int(opt.state[p]["step"]) == int(ref_opt.state[q]["step"]) == STEPS - 1
        torch.testing.assert_close(opt.state[p]["square_avg"], ref_opt.state[q]["square_avg"],
                                   rtol=1e-6, atol=1e-9)
    # AMP must not pass a scaled gradient through: the grads left are what torch left
    # (scaled when the scaler handed the scale to step(), unscaled after unscale_)


@pytest.mark.parametrize("path", list(PATHS))
def test_grad_scaler_with_bf16_params(path):
    """bf16 params (float32 state by default) under a scaler: each step equals
    torch.optim.RMSprop's float32 step from the same point on the unscaled gradient, rounded
    once to bf16; the param dtype is kept."""
    model = make_model().to(torch.bfloat16)
    opt = RMSprop(model.parameters(), **OPTS, **PATHS[path])
    shadow = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    ref_opt = torch.optim.RMSprop(shadow, **OPTS, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for t in range(3):
        x, y = data(t)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x.to(torch.bfloat16)).float(), y)
        scaler.scale(loss).backward()
        for s, p in zip(shadow, model.parameters()):
            s.data = p.detach().float()
            s.grad = p.grad.float() / scaler.get_scale()  # a power of two: exact
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
        for s, p in zip(shadow, model.parameters()):
            assert p.dtype == torch.bfloat16
            assert opt.state[p]["square_avg"].dtype == torch.float32
            torch.testing.assert_close(p.detach().float(), s.detach().to(torch.bfloat16).float(),
                                       rtol=8e-3, atol=1e-6)
    assert int(opt.state[next(model.parameters())]["step"]) == 3


# ------------------------------------------------------------------ torch.compile

def _train(model, opt, compiled=None, steps=4):
    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    fn = compiled(step) if compiled else step
    times = []
    for t in range(steps):
        x, y = data(t)
        t0 = time.perf_counter()
        fn(x, y)
        times.append(time.perf_counter() - t0)
    return times


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_compiled_step_has_no_graph_break_in_rmsprop_and_no_recompiles():
    """foreach path under torch.compile: dynamo must not break a graph inside this package
    (each break splits the step, and the frame after it guards on gradients that
    zero_grad(set_to_none=True) frees, so it recompiles on every step), and after the first
    step nothing recompiles (the state is created by `_init_group`, which dynamo runs eagerly
    before tracing). Results equal the eager run."""
    from torch._dynamo.testing import CompileCounter

    import rmsprop

    package_dir = os.path.dirname(rmsprop.__file__)
    torch._dynamo.reset()
    torch._logging.set_logs(graph_breaks=True)
    collect = _Collect()
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n.endswith("__graph_breaks")]
    for lg in loggers:
        lg.addHandler(collect)
    try:
        counter = CompileCounter()
        model = make_model()
        opt = RMSprop(model.parameters(), **OPTS, foreach=True, fused=False)
        _train(model, opt, lambda f: torch.compile(f, backend=counter), 1)
        warm = counter.frame_count
        _train(model, opt, lambda f: torch.compile(f, backend=counter), 2)
        _train(model, opt, lambda f: torch.compile(f, backend=counter), 3)
        later = counter.frame_count - warm
    finally:
        for lg in loggers:
            lg.removeHandler(collect)
        torch._logging.set_logs()
        torch._dynamo.reset()
    ours = sorted({m.splitlines()[0] for m in collect.messages if package_dir in m})
    assert not ours, "graph breaks inside rmsprop:\n" + "\n".join(ours)
    assert later == 0, f"{later} frames compiled again in steps 2-6 (recompiles)"
    ref = make_model()
    ref_opt = RMSprop(ref.parameters(), **OPTS, foreach=True, fused=False)
    for steps in (1, 2, 3):  # the same data sequence as the compiled calls
        _train(ref, ref_opt, None, steps)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the counting backend runs eagerly


@pytest.mark.slow
def test_compiled_step_raises_on_a_nonfinite_gradient_and_changes_nothing():
    """nonfinite="raise" inside an inductor graph: the step fails before any param or state
    is written (the check must survive inductor's algebra: sum(g * 0) would fold to 0)."""
    torch._dynamo.reset()
    model = make_model()
    opt = RMSprop(model.parameters(), lr=0.01)
    step = torch.compile(opt.step)
    for t in range(3):
        x, y = data(t)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if t == 2:
            model[2].weight.grad[1, 3] = float("inf")
            before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
            with pytest.raises(RuntimeError, match="non-finite gradient"):
                step()
        else:
            step()
        opt.zero_grad()
    torch._dynamo.reset()
    params, state = before
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(v, state["state"][k][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("path", ["foreach"])
def test_compiled_step_matches_eager_inductor(path):
    torch._dynamo.reset()
    model, ref = make_model(), make_model()
    start = [p.detach().clone() for p in ref.parameters()]
    times = _train(model, RMSprop(model.parameters(), **OPTS, **PATHS[path]),
                   lambda f: torch.compile(f), steps=4)
    _train(ref, RMSprop(ref.parameters(), **OPTS, **PATHS[path]), None, 4)
    torch._dynamo.reset()
    print(f"torch.compile (inductor), {path}: first step {times[0]:.2f} s, "
          f"later {', '.join(f'{t:.3f}' for t in times[1:])} s")
    for a, b, a0 in zip(model.parameters(), ref.parameters(), start):
        # Inductor fuses and reorders float32 arithmetic, a few ulps per operation, and the
        # centered denominator sqrt(v - m^2) amplifies them by v / (v - m^2): bound the
        # difference by a small share of how far the run moved the tensor (a wrong
        # operation would move it by a share of order 1).
        moved = float((b.detach() - a0).abs().max())
        assert moved > 0
        assert float((a.detach() - b.detach()).abs().max()) <= 1e-3 * moved
