"""rmsprop.monitor: each check fires exactly at its documented threshold, the sinks receive the
statistics, and on real training the warnings fire on a badly initialised deep network and not
on a healthy one.

Oracles: scripted statistics with known threshold crossings (closed form), and the gradients,
parameter changes and state read directly from the tensors (for the real optimizer's stats).
"""

from __future__ import annotations

import math
import warnings

import pytest

from rmsprop.monitor import HealthWarning, Monitor, RmspropHealthWarning

_KEYS = ("grad_rms", "update_rms", "update_to_param_rms", "step_min", "step_median", "step_max",
         "eps_dominated_fraction")


def _entry(grad_rms: float = 1.0, ratio: float = 1e-3, eps_frac: float = 0.0,
           step: int = 1) -> dict:
    return dict(step=step, grad_rms=grad_rms, update_rms=1e-3, update_to_param_rms=ratio,
                step_min=1e-3, step_median=1e-2, step_max=1e-1, eps_dominated_fraction=eps_frac)


class _Scripted:
    """An optimizer stand-in whose stats() returns what the test sets."""

    def __init__(self, eps: float = 1e-8) -> None:
        self.param_groups = [{"eps": eps}]
        self.current: dict = {}

    def stats(self) -> dict:
        return self.current


def _feed(mon: Monitor, opt: _Scripted, entries, *, params=None, skipped: int = 0):
    out = []
    for i, e in enumerate(entries):
        group = dict(e, skipped_steps=skipped)
        opt.current = {"groups": [group]}
        if params is not None:
            opt.current["params"] = params[i]
        out.append(mon.update())
    return out


def _kinds(found: list[HealthWarning]) -> list[str]:
    return [w.kind for w in found]


# ------------------------------------------------------------------------------------------
# thresholds, on scripted statistics


@pytest.mark.parametrize("last, fires", [(1e-3, True), (1.01e-3, False)])
def test_vanishing_fires_when_grad_rms_drops_by_the_factor_within_the_window(last, fires):
    opt = _Scripted()
    mon = Monitor(opt, window=10, emit=False)
    series = [1.0] + [0.5] * 8 + [last]  # the maximum is 1.0, ten updates = one window
    out = _feed(mon, opt, [_entry(g) for g in series])
    assert all(not o for o in out[:-1])
    assert ("vanishing" in _kinds(out[-1])) is fires
    if fires:
        w = out[-1][0]
        assert (w.step, w.series, w.value, w.threshold) == (10, "group 0", 1e-3, 1e-3)
        assert "fell to 1.0e-03x its maximum 1 within 10 updates" in w.message


def test_vanishing_needs_a_full_window():
    opt = _Scripted()
    mon = Monitor(opt, window=10, emit=False)
    out = _feed(mon, opt, [_entry(g) for g in [1.0] * 5 + [1e-9]])
    assert not any(out)
    # a drop the window no longer remembers does not count
    mon = Monitor(opt, window=5, emit=False)
    out = _feed(mon, opt, [_entry(g) for g in [1.0] + [1e-2] * 5 + [1.5e-5]])
    assert not any(out)


@pytest.mark.parametrize("last, fires", [(1e3, True), (999.0, False)])
def test_exploding_fires_on_growth_over_the_window_minimum(last, fires):
    opt = _Scripted()
    mon = Monitor(opt, window=10, patience=3, emit=False)
    out = _feed(mon, opt, [_entry(g) for g in (2.0, 1.0, 3.0, last)])
    assert ("exploding" in _kinds(out[-1])) is fires
    assert not any(out[:-1])


def test_exploding_growth_is_measured_from_the_eps_floor():
    opt = _Scripted(eps=1e-8)
    mon = Monitor(opt, window=10, patience=3, emit=False)
    assert mon.exploding_floor == 1e-8
    out = _feed(mon, opt, [_entry(g) for g in (1e-12, 1e-12, 1e-12, 9.9e-6)])
    assert not any(out), "growth from below eps is not an explosion"
    out = _feed(mon, opt, [_entry(1e-5)])
    assert _kinds(out[-1]) == ["exploding"]
    mon = Monitor(opt, window=10, patience=3, exploding_floor=0.0, emit=False)
    out = _feed(mon, opt, [_entry(g) for g in (1e-12, 1e-12, 1e-12, 1e-9)])
    assert _kinds(out[-1]) == ["exploding"]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_gradient_rms_is_exploding_at_once(bad):
    opt = _Scripted()
    mon = Monitor(opt, emit=False)
    out = _feed(mon, opt, [_entry(bad)])
    assert _kinds(out[0]) == ["exploding"] and "gradient RMS is" in out[0][0].message


def test_absolute_ceiling():
    opt = _Scripted()
    mon = Monitor(opt, exploding_rms=100.0, emit=False)
    out = _feed(mon, opt, [_entry(100.0), _entry(100.5)])
    assert not out[0] and _kinds(out[1]) == ["exploding"]


def test_stalled_needs_patience_and_respects_cooldown():
    opt = _Scripted()
    mon = Monitor(opt, window=10, patience=3, stall_ratio=1e-7, cooldown=4, emit=False)
    ratios = [1e-8, 1e-8, 2e-7, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8, 1e-8]
    out = _feed(mon, opt, [_entry(ratio=r) for r in ratios])
    fired = [i + 1 for i, o in enumerate(out) if "stalled" in _kinds(o)]
    # the run of 3 starts at update 4 -> fires at 6; then once per 4 updates
    assert fired == [6, 10]
    assert "update RMS / param RMS = 1e-08 < 1e-07 for 3 updates" in out[5][0].message
    # exactly at the threshold is not stalled
    mon = Monitor(opt, patience=1, stall_ratio=1e-7, emit=False)
    assert not _feed(mon, opt, [_entry(ratio=1e-7)])[0]


def test_eps_dominated_fraction_threshold_is_strict():
    opt = _Scripted()
    mon = Monitor(opt, patience=2, eps_fraction=0.5, emit=False)
    assert not any(_feed(mon, opt, [_entry(eps_frac=0.5)] * 4))
    out = _feed(mon, opt, [_entry(eps_frac=0.51)] * 2)
    assert not out[0] and _kinds(out[1]) == ["eps_dominated"]
    assert "51% of the elements of group 0" in out[1][0].message


def test_skipped_steps_fire_and_stale_stats_are_not_added_to_history():
    opt = _Scripted()
    mon = Monitor(opt, window=4, emit=False)  # fires with the current value + 3 before it
    out = _feed(mon, opt, [_entry(1.0)] * 2)
    out += _feed(mon, opt, [_entry(1.0)], skipped=1)
    out += _feed(mon, opt, [_entry(1e-3)], skipped=1)
    assert _kinds(out[2]) == ["skipped"] and "skipped 1 step(s)" in out[2][0].message
    # the skipped update's stale stats did not count: only 2 values before the 1e-3
    assert not out[3]
    out = _feed(mon, opt, [_entry(1e-3)], skipped=1)
    assert _kinds(out[0]) == ["vanishing"]


def test_per_parameter_spread_names_the_starved_parameter():
    opt = _Scripted()
    mon = Monitor(opt, patience=2, vanishing_spread=1e-4, emit=False)
    params = [{"first.weight": _entry(1e-9), "last.weight": _entry(1e-5 + 1e-12)}] * 2
    out = _feed(mon, opt, [_entry(1.0)] * 2, params=params)
    assert not out[0]
    assert _kinds(out[1]) == ["vanishing"] and out[1][0].series == "'first.weight'"
    assert "that of 'last.weight'" in out[1][0].message
    mon = Monitor(opt, patience=1, vanishing_spread=1e-4, emit=False)
    params = [{"first.weight": _entry(1e-9), "last.weight": _entry(1e-5 - 1e-12)}]
    assert not _feed(mon, opt, [_entry(1.0)], params=params)[0]


def test_warnings_are_emitted_with_their_category():
    opt = _Scripted()
    mon = Monitor(opt)
    with pytest.warns(RmspropHealthWarning, match="exploding gradients in group 0"):
        _feed(mon, opt, [_entry(math.inf)])
    assert _kinds(mon.warnings) == ["exploding"]


def test_logger_receives_every_statistic_flattened():
    opt = _Scripted()
    calls = []
    mon = Monitor(opt, logger=lambda d, s: calls.append((d, s)), emit=False)
    e = _entry(0.25, ratio=3e-3, eps_frac=0.125)
    _feed(mon, opt, [e], params=[{"w": _entry(0.5)}])
    mon.update(step=42)
    (d, step), (_, step2) = calls
    assert step == 1 and step2 == 42
    for k in _KEYS:
        assert d[f"rmsprop/group0/{k}"] == e[k]
        assert d[f"rmsprop/param/w/{k}"] == _entry(0.5)[k]
    assert d["rmsprop/group0/skipped_steps"] == 0 and d["rmsprop/warnings"] == 0


def test_bad_arguments_are_refused():
    opt = _Scripted()
    for kw, match in [({"window": 1}, "Invalid window"), ({"patience": 0}, "Invalid patience"),
                      ({"vanishing_drop": 1.0}, "Invalid vanishing_drop"),
                      ({"eps_fraction": 0}, "Invalid eps_fraction"),
                      ({"exploding_growth": 0.5}, "Invalid exploding_growth"),
                      ({"stall_ratio": -1}, "Invalid stall_ratio"),
                      ({"stall_ratio": float("inf")}, "Invalid stall_ratio"),
                      ({"exploding_floor": float("nan")}, "Invalid exploding_floor"),
                      ({"exploding_floor": -1.0}, "Invalid exploding_floor"),
                      ({"exploding_rms": "5"}, "Invalid exploding_rms"),
                      ({"cooldown": -5}, "Invalid cooldown"),
                      ({"cooldown": 2.7}, "Invalid cooldown"),
                      ({"cooldown": "x"}, "Invalid cooldown"),
                      ({"patience": True}, "Invalid patience")]:
        with pytest.raises(ValueError, match=match):
            Monitor(opt, **kw)
    for kw, match in [({"emit": "no"}, "emit must be True or False"),
                      ({"prefix": 5}, "prefix must be a str")]:
        with pytest.raises(TypeError, match=match):
            Monitor(opt, **kw)
    m = Monitor(opt)
    with pytest.raises(ValueError, match="Invalid every"):
        m.attach(every=True)
    with pytest.raises(ValueError, match="Invalid step: 'abc'"):
        m.update("abc")
    assert m.updates == 0 and m.warnings == []  # the refused call changed nothing
    with pytest.raises(TypeError, match="needs an optimizer with stats"):
        Monitor(object())
    with pytest.raises(TypeError, match="logger must be a callable"):
        Monitor(opt, logger=3)
    with pytest.raises(TypeError, match="SummaryWriter"):
        Monitor(opt, tensorboard=3)


# ------------------------------------------------------------------------------------------
# real training with rmsprop.torch.RMSprop

torch = pytest.importorskip("torch")


@pytest.fixture
def one_thread():
    # tiny tensors: intra-op threads only add synchronisation, never speed
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _deep_net(init: str, depth: int = 12, width: int = 16) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(depth):
        lin = torch.nn.Linear(width, width if i < depth - 1 else 1)
        if init == "tiny":
            torch.nn.init.normal_(lin.weight, std=0.02)
        else:
            torch.nn.init.xavier_normal_(lin.weight, gain=torch.nn.init.calculate_gain("tanh"))
        torch.nn.init.zeros_(lin.bias)
        layers += [lin, torch.nn.Tanh()] if i < depth - 1 else [lin]
    return torch.nn.Sequential(*layers)


def _train(net, steps: int = 60, **mon_kw):
    from rmsprop.torch import RMSprop

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen)
    y = torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2]
    opt = RMSprop(net.named_parameters(), lr=1e-3, track_stats="params")
    mon = Monitor(opt, window=30, emit=False, **mon_kw).attach()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return mon, losses


def test_warnings_fire_on_a_badly_initialised_deep_network(one_thread):
    mon, losses = _train(_deep_net("tiny"))
    kinds = {w.kind for w in mon.warnings}
    assert {"vanishing", "eps_dominated"} <= kinds, kinds
    starved = {w.series for w in mon.warnings if w.kind == "vanishing"}
    assert "'0.weight'" in starved  # the first layer, as the depth signature predicts
    # found as early as the patience (5 updates) allows
    assert min(w.step for w in mon.warnings if w.kind == "vanishing") == 5
    assert losses[-1] > 0.9 * losses[0]  # and indeed it barely learns


def test_no_warnings_on_a_healthy_deep_network(one_thread):
    mon, losses = _train(_deep_net("xavier"))
    assert mon.warnings == [], [str(w) for w in mon.warnings]
    assert losses[-1] < 0.5 * losses[0]


def test_logged_stats_match_the_tensors(one_thread):
    from rmsprop.torch import RMSprop

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    lr, eps = 1e-2, 1e-8
    opt = RMSprop(net.named_parameters(), lr=lr, eps=eps, track_stats="params")
    logged = []
    Monitor(opt, logger=lambda d, s: logged.append((dict(d), s)), emit=False).attach()
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    for t in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        params = [p for _, p in net.named_parameters()]
        grads = torch.cat([p.grad.reshape(-1).double() for p in params])
        before = torch.cat([p.detach().reshape(-1).double() for p in params])
        opt.step()
        after = torch.cat([p.detach().reshape(-1).double() for p in params])
        v = torch.cat([opt.state[p]["square_avg"].reshape(-1).double() for p in params])
        d, step = logged[-1]
        assert step == t + 1
        rms = lambda z: float(z.square().mean().sqrt())  # noqa: E731
        assert d["rmsprop/group0/grad_rms"] == pytest.approx(rms(grads), rel=1e-6)
        assert d["rmsprop/group0/update_rms"] == pytest.approx(rms(before - after), rel=1e-5)
        assert d["rmsprop/group0/update_to_param_rms"] == pytest.approx(
            rms(before - after) / rms(after), rel=1e-5)
        steps = lr / (v.sqrt() + eps)
        assert d["rmsprop/group0/step_min"] == pytest.approx(float(steps.min()), rel=1e-6)
        assert d["rmsprop/group0/step_max"] == pytest.approx(float(steps.max()), rel=1e-6)
        assert d["rmsprop/group0/eps_dominated_fraction"] == float((v.sqrt() < eps).double()
                                                                   .mean())
        g0 = net[0].weight.grad.double()
        assert d["rmsprop/param/0.weight/grad_rms"] == pytest.approx(rms(g0), rel=1e-6)


def test_attach_every_and_detach(one_thread):
    from rmsprop.torch import RMSprop

    p = torch.nn.Parameter(torch.ones(3))
    opt = RMSprop([p], track_stats=True)
    mon = Monitor(opt, emit=False).attach(every=2)
    for _ in range(5):
        p.grad = torch.ones(3)
        opt.step()
    assert mon.updates == 2
    mon.detach()
    p.grad = torch.ones(3)
    opt.step()
    assert mon.updates == 2
    with pytest.raises(ValueError, match="track_stats"):
        Monitor(RMSprop([p]))


def test_skipped_nonfinite_steps_are_reported(one_thread):
    from rmsprop.torch import RMSprop

    p = torch.nn.Parameter(torch.ones(3))
    opt = RMSprop([p], nonfinite="skip", track_stats=True)
    mon = Monitor(opt, emit=False, cooldown=1).attach()
    quiet = Monitor(opt, emit=False).attach()  # default cooldown: once per window
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the optimizer's own one-time notice
        for g in (1.0, math.nan, 1.0, math.inf):
            p.grad = torch.full((3,), g)
            opt.step()
    assert opt.skipped_steps == 2
    assert [(w.kind, w.step) for w in mon.warnings] == [("skipped", 2), ("skipped", 4)]
    assert "(2 in total)" in mon.warnings[-1].message
    assert [(w.kind, w.step) for w in quiet.warnings] == [("skipped", 2)]


def test_tensorboard_receives_scalars_and_warnings(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rmsprop.torch import RMSprop

    p = torch.nn.Parameter(torch.ones(4))
    opt = RMSprop([p], nonfinite="ignore", track_stats=True)
    mon = Monitor(opt, tensorboard=tmp_path, emit=False).attach()
    grads = []
    for g in (0.5, 2.0, math.inf):
        p.grad = torch.full((4,), g)
        grads.append(float(p.grad.double().square().mean().sqrt()))
        opt.step()
    mon.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("rmsprop/group0/grad_rms")]
    assert got[:2] == [(1, pytest.approx(0.5)), (2, pytest.approx(2.0))]
    assert got[2][0] == 3 and math.isinf(got[2][1])
    texts = acc.Tensors("rmsprop/health/text_summary")
    assert [t.step for t in texts] == [3]
    assert b"exploding gradients in group 0" in texts[0].tensor_proto.string_val[0]
