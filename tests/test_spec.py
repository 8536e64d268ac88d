"""The NumPy reference against closed forms, and the option validation."""

import math
import warnings

import numpy as np
import pytest

from rmsprop import PRESETS, Options, spec
from rmsprop.numpy import RMSprop as NumpyRMSprop


@pytest.mark.parametrize("alpha,eps,eps_in_sqrt", [(0.99, 1e-8, False), (0.9, 1e-3, True),
                                                   (0.5, 0.0, False)])
def test_first_step_closed_form(alpha, eps, eps_in_sqrt):
    # From v0 = 0: v = (1-alpha) g^2, so the step is lr*g/(sqrt(1-alpha)|g| + eps).
    g = np.array([3.0, -0.25, 1e-3, 7.5])
    lr = 0.1
    o = Options(lr=lr, alpha=alpha, eps=max(eps, 0.0), eps_in_sqrt=eps_in_sqrt) if eps else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o = o or Options(lr=lr, alpha=alpha, eps=0.0)
    p, _ = spec.step(np.zeros(4), g, spec.init_state(np.zeros(4), o), o)
    if eps_in_sqrt:
        expected = -lr * g / np.sqrt((1 - alpha) * g * g + eps)
    else:
        expected = -lr * g / (math.sqrt(1 - alpha) * np.abs(g) + eps)
    np.testing.assert_allclose(p, expected, rtol=1e-14)


def test_constant_gradient_drives_v_to_g2_geometrically():
    # v_t = g^2 (1 - alpha^t) for v0 = 0: the gap to g^2 shrinks by alpha per step.
    o = Options(alpha=0.9)
    g = np.array([2.0, -0.5])
    st = spec.init_state(g, o)
    p = np.zeros(2)
    for t in range(1, 60):
        p, st = spec.step(p, g, st, o)
        np.testing.assert_allclose(st["square_avg"], g * g * (1 - 0.9 ** t), rtol=1e-12)


def test_bias_correction_makes_first_step_lr_sign():
    # With bias correction v_hat = g^2 exactly at t=1, so the step is lr*g/(|g|+eps) ~ lr*sign(g).
    o = Options(lr=0.05, alpha=0.99, eps=0.0 + 1e-12, bias_correction=True)
    g = np.array([4.0, -0.003])
    p, _ = spec.step(np.zeros(2), g, spec.init_state(g, o), o)
    np.testing.assert_allclose(p, -0.05 * np.sign(g), rtol=1e-9)


def test_centered_never_nan_on_constant_gradient_in_float32():
    # E[g^2] - E[g]^2 cancels to tiny negatives in float32; the clamp keeps sqrt finite.
    o = Options(centered=True, alpha=0.9, eps=1e-8)
    g = np.full(1000, 100.0 + 1e-3, dtype=np.float32)
    p = np.zeros(1000, dtype=np.float32)
    st = spec.init_state(p, o)
    for _ in range(300):
        p, st = spec.step(p, g, st, o)
        assert np.isfinite(p).all()


def test_complex_is_per_component():
    # Complex params are pairs of reals: the update of (re, im) equals two real updates.
    o = Options(lr=0.1, momentum=0.5)
    z = np.array([1 + 2j, -3 + 0.5j])
    gz = np.array([0.3 - 1j, 2 + 2j])
    pz, st = spec.step(z, gz, spec.init_state(z, o), o)
    pr, _ = spec.step(z.view(np.float64), gz.view(np.float64),
                      spec.init_state(z.view(np.float64), o), o)
    np.testing.assert_array_equal(pz.view(np.float64), pr)
    assert st["square_avg"].shape == (4,)


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-1.0), "learning rate"), (dict(lr=float("nan")), "learning rate"),
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(eps=-1e-8), "epsilon"),
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(nesterov=True), "Nesterov"),
    (dict(initial_square_avg=-1.0), "initial_square_avg"),
    (dict(alpha=1.0, bias_correction=True), "bias_correction"),
    (dict(centered="yes"), "centered"),
])
def test_invalid_options_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        Options(**bad)


def test_eps_zero_warns():
    with pytest.warns(RuntimeWarning, match="eps=0"):
        Options(eps=0.0)


def test_centered_with_bias_correction_warns_of_its_first_step():
    # Closed form with exact arithmetic (g and alpha powers of two): v = m^2 / (1 - alpha)
    # after one step, so the corrected variance is exactly 0 and the step is lr * g / eps.
    opts = dict(lr=1e-3, alpha=0.5, eps=1e-8, centered=True, bias_correction=True)
    with pytest.warns(RuntimeWarning, match="first step is lr\\*g/eps"):
        o = Options(**opts)
    p, g = np.array([1.0]), np.array([0.5])
    new, _ = spec.step(p, g, spec.init_state(p, o), o)
    assert new[0] == 1.0 - 1e-3 * 0.5 / 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Options(**{**opts, "initial_square_avg": 0.1})
        Options(**{**opts, "bias_correction": False})


def test_numpy_optimizer_groups_none_grads_and_atomic_failure():
    a, b = np.ones(3), np.ones(2)
    opt = NumpyRMSprop([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    opt.step([np.array([1.0, 2.0, 3.0]), None])
    np.testing.assert_array_equal(b, np.ones(2))  # grad None: untouched, no state
    assert opt.state[1][0] is None
    g = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(a, 1 - 0.1 * g / (math.sqrt(0.01) * g + 1e-8), rtol=0, atol=1e-15)
    before = a.copy(), b.copy()
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones(3), np.ones(5)])
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(b, before[1])


def test_presets_are_read_only_and_cited():
    with pytest.raises(TypeError):
        PRESETS["pytorch"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["keras"].options["lr"] = 1.0  # type: ignore[index]
    for preset in PRESETS.values():
        assert preset.source


def test_unknown_preset_and_missing_lr():
    with pytest.raises(ValueError, match="Unknown preset"):
        NumpyRMSprop.from_preset("adam", [np.zeros(1)])
    with pytest.raises(ValueError, match="no default learning rate"):
        NumpyRMSprop.from_preset("tf1", [np.zeros(1)])
