"""Every non-torch preset against its original: the peer library itself, or a transcription.

Oracles (never our own code):

* ``keras``: Keras 3's ``keras.optimizers.RMSprop`` run on the torch backend;
* ``optax``: ``optax.rmsprop`` (jax, float64 via ``jax.enable_x64``);
* ``timm``: timm's ``RMSpropTF``, loaded from ``timm/optim/rmsprop_tf.py`` by file path (the
  ``timm`` package itself needs torchvision, which this project does not install);
* ``sb3``: Stable-Baselines3's ``RMSpropTFLike``, loaded from
  ``stable_baselines3/common/sb2_compat/rmsprop_tf_like.py`` by file path (the file needs only
  torch), and a transcription of that file where SB3 is not installed;
* ``tf1``, ``hinton2012``, ``graves2013``, ``dqn2015``: NumPy transcriptions written here from
  the original equations or code (cited at each one), independent of :mod:`rmsprop.spec`.

Each comparison runs both ``rmsprop.torch.RMSprop.from_preset`` and
``rmsprop.numpy.RMSprop.from_preset`` for 120 steps on a small noisy quadratic (three params
including a matrix, two param groups, an lr schedule that changes lr mid-run so that
``lr_in_momentum`` matters) and compares the params after every step.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import rmsprop

pytestmark = pytest.mark.peer

# --------------------------------------------------------------------------------------------
# The problem: f(p) = sum_i curv_i*(p_i - target_i)^2 / 2 plus a fixed gradient-noise sequence.
# Gradients are computed in float64 from each run's own current params, so weight decay and the
# params themselves feed back into the trajectory as in real training.

STEPS = 120
SHAPES = [(4, 3), (6,), (2, 2)]
GROUP_OF = (0, 0, 1)  # params 0 and 1 in group 0, param 2 in group 1
# Steps at which param 1 has no gradient (grad None: skipped, state untouched), for the peers
# that support it (timm, the transcriptions).
NONE_STEPS = frozenset(range(5, STEPS, 9))
# Learning rates exactly representable in float32 (powers of two times k/64), so that peers
# which hold lr in a float32 variable (Keras) still agree with float64 to 1e-12.
BASE_LR = (2.0 ** -7, 2.0 ** -9)
SCHEDULE = tuple(max(1, round(64 * (1.0 - 0.9 * t / STEPS))) / 64 if t >= 30 else 1.0
                 for t in range(STEPS))


def _make_problem(seed: int = 20261125):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s) for s in SHAPES]
    target = [rng.standard_normal(s) for s in SHAPES]
    curv = [rng.uniform(0.1, 2.0, s) for s in SHAPES]
    # Noise with per-element scales from 1e-3 to 3, so some coordinates sit near eps/v0 and
    # others dominate their running averages.
    noise = [rng.standard_normal((STEPS,) + s) * 10.0 ** rng.uniform(-3, 0.5, s)
             for s in SHAPES]
    return init, target, curv, noise


INIT, TARGET, CURV, NOISE = _make_problem()


def grads_at(t: int, params: Sequence[np.ndarray], with_none: bool = False
             ) -> list[np.ndarray | None]:
    """float64 gradients of the noisy quadratic at step ``t`` for the current ``params``."""
    out: list[np.ndarray | None] = []
    for i, p in enumerate(params):
        if with_none and i == 1 and t in NONE_STEPS:
            out.append(None)
        else:
            out.append(CURV[i] * (np.asarray(p, np.float64) - TARGET[i]) + NOISE[i][t])
    return out


def lr_at(t: int, group: int) -> float:
    """The learning rate of param group ``group`` at step ``t`` (0-based)."""
    return BASE_LR[group] * SCHEDULE[t]


def _relative(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(a - ref) / (np.abs(ref) + 1.0)


def assert_trajectories_close(ours: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    """Params after every step agree to ``rtol`` relative (params are O(1), so the same as an
    absolute floor)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.all(np.isfinite(ref)), f"{what}: the oracle itself went non-finite"
    err = _relative(ours, ref)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= rtol, (f"{what}: max relative error {err.max():.3g} > {rtol:g} at step "
                               f"{worst[0] + 1}, element {worst[1]}: ours {ours[worst]!r}, "
                               f"original {ref[worst]!r}")
    # The run must actually move (an optimizer that does nothing would match nothing anyway,
    # but say so plainly).
    assert np.abs(ref[-1] - np.concatenate([p.ravel() for p in INIT])).max() > 1e-3


def _flat(params: Sequence[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.float64).ravel() for p in params])


# --------------------------------------------------------------------------------------------
# Our optimizers, driven the same way for every oracle.

def _group_dicts(make: Callable[[int], Any], group_overrides: Sequence[dict]) -> list[dict]:
    groups: list[dict] = [{"params": []} for _ in group_overrides]
    for i, g in enumerate(GROUP_OF):
        groups[g]["params"].append(make(i))
    for g, extra in zip(groups, group_overrides):
        g.update(extra)
    return groups


def run_ours_torch(preset: str, overrides: dict, group_overrides: Sequence[dict] = ({}, {}),
                   dtype: str = "float64", schedule: bool = True,
                   with_none: bool = False, path: dict | None = None) -> np.ndarray:
    """``rmsprop.torch.RMSprop.from_preset(preset, groups, **overrides, **path)``; with
    ``schedule`` the group lr is set to ``lr_at(t, group)`` before step ``t``. ``path`` picks
    the implementation (``{}``: the default, the fused kernel on CPU where it is built)."""
    import torch

    from rmsprop.torch import RMSprop

    tdtype = getattr(torch, dtype)
    params = [torch.tensor(p, dtype=tdtype, requires_grad=True) for p in INIT]
    groups = _group_dicts(lambda i: params[i], group_overrides)
    if schedule:
        for k, g in enumerate(groups):
            g["lr"] = lr_at(0, k)
    with warnings.catch_warnings():
        # hinton2012's eps=0 warning (its slide has no epsilon), asserted in its own test; the
        # centered + bias_correction warning of optax's richest case, asserted in
        # test_optax_centered_bias_correction_warns.
        warnings.filterwarnings("ignore", "eps=0", RuntimeWarning)
        warnings.filterwarnings("ignore", "centered=True with bias_correction", RuntimeWarning)
        opt = RMSprop.from_preset(preset, groups, **overrides, **(path or {}))
        return _drive_torch(opt, params, tdtype, schedule, with_none)


def _drive_torch(opt, params, tdtype, schedule: bool, with_none: bool) -> np.ndarray:
    """Step a torch optimizer (ours or timm's) through the problem; the params after each step."""
    import torch

    traj = np.empty((STEPS, sum(p.numel() for p in params)))
    for t in range(STEPS):
        if schedule:
            for k, g in enumerate(opt.param_groups):
                g["lr"] = lr_at(t, k)
        grads = grads_at(t, [p.detach().numpy() for p in params], with_none)
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.tensor(g, dtype=tdtype)
        opt.step()
        traj[t] = _flat([p.detach().numpy() for p in params])
    return traj


def run_ours_numpy(preset: str, overrides: dict, group_overrides: Sequence[dict] = ({}, {}),
                   dtype: str = "float64", schedule: bool = True,
                   with_none: bool = False) -> np.ndarray:
    """``rmsprop.numpy.RMSprop.from_preset(preset, groups, **overrides)``; ``.step(grads)``
    updates the arrays in place."""
    from rmsprop.numpy import RMSprop

    arrays = [p.astype(dtype) for p in INIT]
    groups = _group_dicts(lambda i: arrays[i], group_overrides)
    if schedule:
        for k, g in enumerate(groups):
            g["lr"] = lr_at(0, k)
    traj = np.empty((STEPS, sum(a.size for a in arrays)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "eps=0", RuntimeWarning)
        warnings.filterwarnings("ignore", "centered=True with bias_correction", RuntimeWarning)
        opt = RMSprop.from_preset(preset, groups, **overrides)
        for t in range(STEPS):
            if schedule:
                for k, g in enumerate(opt.param_groups):
                    g["lr"] = lr_at(t, k)
            opt.step(grads_at(t, arrays, with_none))
            traj[t] = _flat(arrays)
    return traj


BACKENDS: dict[str, Callable[..., np.ndarray]] = {"torch": run_ours_torch,
                                                  "numpy": run_ours_numpy}
# The torch optimizer's other implementations (the default on CPU is the fused kernel where it
# is built), checked against each original on one rich case per preset.
TORCH_PATHS = {"foreach": {"foreach": True}, "for-loop": {"foreach": False, "fused": False}}


# --------------------------------------------------------------------------------------------
# Keras 3 (torch backend). The backend is fixed when keras is first imported, so the variables
# are set only around that import and restored at once: nothing leaks into other tests.

def load_keras(keras_home: str):
    """Import Keras 3 on the torch backend; return ``(module, None)`` or ``(None, reason)``."""
    mod = sys.modules.get("keras")
    if mod is None:
        saved = {k: os.environ.get(k) for k in ("KERAS_BACKEND", "KERAS_HOME")}
        os.environ["KERAS_BACKEND"] = "torch"
        # Keras writes keras.json under KERAS_HOME on first import: keep it out of $HOME.
        os.environ["KERAS_HOME"] = keras_home
        try:
            mod = importlib.import_module("keras")
        except Exception as exc:  # pragma: no cover - depends on the environment
            return None, f"keras cannot be imported: {exc!r}"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if mod.config.backend() != "torch":  # pragma: no cover - keras imported elsewhere first
        return None, f"keras was already imported with backend {mod.config.backend()!r}"
    return mod, None


@pytest.fixture(scope="module")
def keras(tmp_path_factory):
    mod, reason = load_keras(str(tmp_path_factory.mktemp("keras_home")))
    if mod is None:
        pytest.skip(reason)
    return mod


def _keras_numpy(variable) -> np.ndarray:
    # On the torch backend a Variable's .value is a torch tensor (keras.ops.convert_to_numpy
    # would work too but warns on NumPy 2).
    return variable.value.detach().cpu().numpy()


def run_keras(keras, kwargs_per_group: Sequence[dict], dtype: str = "float32",
              schedule: bool = True) -> np.ndarray:
    """One ``keras.optimizers.RMSprop`` per param group (Keras has no param groups; separate
    optimizers on disjoint variables are what groups mean). With ``schedule`` the lr is a
    ``LearningRateSchedule`` returning ``lr_at(iterations, group)``."""

    class Table(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, group: int):
            self.group = group

        def __call__(self, step):
            return lr_at(int(getattr(step, "value", step)), self.group)

    variables = [keras.Variable(p.astype(dtype), dtype=dtype) for p in INIT]
    opts = []
    for k, kw in enumerate(kwargs_per_group):
        kw = dict(kw)
        if schedule:
            kw["learning_rate"] = Table(k)
        opts.append(keras.optimizers.RMSprop(**kw))
    traj = np.empty((STEPS, sum(p.size for p in INIT)))
    for t in range(STEPS):
        current = [_keras_numpy(v) for v in variables]
        grads = grads_at(t, current)
        for k, opt in enumerate(opts):
            pairs = [(keras.ops.convert_to_tensor(grads[i].astype(dtype)), variables[i])
                     for i in range(len(INIT)) if GROUP_OF[i] == k]
            opt.apply_gradients(pairs)
        traj[t] = _flat([_keras_numpy(v) for v in variables])
    return traj


# --------------------------------------------------------------------------------------------
# optax (float64 inside jax.enable_x64, restored afterwards).

@pytest.fixture(scope="module")
def optax():
    jax = pytest.importorskip("jax", reason="jax is not installed")
    return jax, pytest.importorskip("optax", reason="optax is not installed")


def run_optax(optax, kwargs_per_group: Sequence[dict], dtype: str = "float64",
              schedule: bool = True) -> np.ndarray:
    """``optax.rmsprop(**kwargs)`` per param group (groups via ``optax.partition``), its lr a
    schedule ``count -> lr_at(count, group)``; the 120 steps run in one jitted ``lax.scan``
    with the gradient of the same noisy quadratic written in jax."""
    jax, optax = optax
    import jax.numpy as jnp

    partition = getattr(optax, "partition", None) or optax.multi_transform
    with jax.enable_x64(dtype == "float64"):
        transforms = {}
        for k, kw in enumerate(kwargs_per_group):
            kw = dict(kw)
            if schedule:
                table = jnp.asarray([lr_at(t, k) for t in range(STEPS)], dtype=dtype)
                kw["learning_rate"] = lambda count, table=table: table[count]
            transforms[f"group{k}"] = optax.rmsprop(**kw)
        tx = partition(transforms, [f"group{g}" for g in GROUP_OF])
        curv, target, noise = ([jnp.asarray(a, dtype=dtype) for a in arrays]
                               for arrays in (CURV, TARGET, NOISE))

        def body(carry, t):
            params, state = carry
            grads = [c * (p - tg) + n[t] for c, p, tg, n in zip(curv, params, target, noise)]
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), jnp.concatenate([p.ravel() for p in params])

        params = [jnp.asarray(p, dtype=dtype) for p in INIT]
        _, traj = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(STEPS)))(
            (params, tx.init(params)))
        return np.asarray(traj, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# timm's RMSpropTF, from its file: a throwaway package whose __path__ is timm/optim, so the
# file's relative imports (._helpers, ._types) resolve without running timm/__init__.py
# (which imports torchvision).

def load_timm_rmsprop_tf():
    """timm's ``RMSpropTF``: ``(class, None)`` or ``(None, reason)``."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None, "timm is not installed"
    optim_dir = os.path.join(list(spec.submodule_search_locations)[0], "optim")
    if not os.path.exists(os.path.join(optim_dir, "rmsprop_tf.py")):
        return None, f"timm has no optim/rmsprop_tf.py under {optim_dir}"
    pkg_name = "_rmsprop_peer_timm_optim"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [optim_dir]
    sys.modules[pkg_name] = pkg
    try:
        module = importlib.import_module(f"{pkg_name}.rmsprop_tf")
    except Exception as exc:  # pragma: no cover - depends on the timm version
        return None, f"timm/optim/rmsprop_tf.py cannot be loaded: {exc!r}"
    finally:
        for name in [n for n in sys.modules if n == pkg_name or n.startswith(pkg_name + ".")]:
            del sys.modules[name]
    return module.RMSpropTF, None


@pytest.fixture(scope="module")
def RMSpropTF():
    cls, reason = load_timm_rmsprop_tf()
    if cls is None:
        pytest.skip(reason)
    return cls


def run_timm(RMSpropTF, kwargs: dict, group_kwargs: Sequence[dict] = ({}, {}),
             dtype: str = "float64", schedule: bool = True, with_none: bool = False,
             foreach: bool | None = None) -> np.ndarray:
    import torch

    tdtype = getattr(torch, dtype)
    params = [torch.tensor(p, dtype=tdtype, requires_grad=True) for p in INIT]
    groups = _group_dicts(lambda i: params[i], group_kwargs)
    if schedule:
        for k, g in enumerate(groups):
            g["lr"] = lr_at(0, k)
    opt = RMSpropTF(groups, foreach=foreach, **kwargs)
    return _drive_torch(opt, params, tdtype, schedule, with_none)


# --------------------------------------------------------------------------------------------
# Transcriptions of the originals that have no installable library here. Written from the
# sources cited at each, in float64, one param at a time; a param whose grad is None is
# skipped with its state untouched (as TF's apply_gradients drops (None, var) pairs).

def _run_transcription(step_fn: Callable, init_state: Callable, hp_per_group: Sequence[dict],
                       schedule: bool, with_none: bool) -> np.ndarray:
    params = [p.copy() for p in INIT]
    states = [init_state(p, hp_per_group[GROUP_OF[i]]) for i, p in enumerate(params)]
    traj = np.empty((STEPS, sum(p.size for p in INIT)))
    for t in range(STEPS):
        grads = grads_at(t, params, with_none)
        for i, g in enumerate(grads):
            if g is None:
                continue
            hp = dict(hp_per_group[GROUP_OF[i]])
            if schedule:
                hp["lr"] = lr_at(t, GROUP_OF[i])
            params[i] = step_fn(params[i], g, states[i], hp)
        traj[t] = _flat(params)
    return traj


def tf1_transcription(hp_per_group, schedule=True, with_none=False):
    """tf.compat.v1.train.RMSPropOptimizer (tensorflow/python/training/rmsprop.py): slot "rms"
    starts at ones (``init_ops.ones_initializer``), "momentum" and "mg" at zeros; the update is
    the ApplyRMSProp / ApplyCenteredRMSProp CPU functors of
    tensorflow/core/kernels/training_ops.cc:
        ms += (grad^2 - ms) * (1 - rho)
        mg += (grad - mg) * (1 - rho)                      [centered]
        mom = mom * momentum + grad * lr / sqrt(ms + epsilon)   [centered: ms - mg^2 + epsilon]
        var -= mom
    """
    def init(p, hp):
        return {"ms": np.ones_like(p), "mg": np.zeros_like(p), "mom": np.zeros_like(p)}

    def step(var, grad, s, hp):
        s["ms"] += (grad * grad - s["ms"]) * (1.0 - hp["decay"])
        if hp.get("centered", False):
            s["mg"] += (grad - s["mg"]) * (1.0 - hp["decay"])
            denom = (s["ms"] - s["mg"] * s["mg"]) + hp["epsilon"]
        else:
            denom = s["ms"] + hp["epsilon"]
        s["mom"] = s["mom"] * hp["momentum"] + grad * hp["lr"] / np.sqrt(denom)
        return var - s["mom"]

    return _run_transcription(step, init, hp_per_group, schedule, with_none)


def hinton2012_transcription(hp_per_group, schedule=True, with_none=False):
    """Tieleman & Hinton, CSC321 lecture 6e, slide "rmsprop: A mini-batch version of rprop":
        MeanSquare(w, t) = 0.9 MeanSquare(w, t-1) + 0.1 (dE/dw (t))^2
        w -= lr * dE/dw / sqrt(MeanSquare(w, t))
    No epsilon and no momentum; the slide gives no initial MeanSquare (0 here, as the preset
    documents)."""
    def init(p, hp):
        return {"ms": np.zeros_like(p)}

    def step(w, dEdw, s, hp):
        s["ms"] = 0.9 * s["ms"] + 0.1 * dEdw ** 2
        return w - hp["lr"] * dEdw / np.sqrt(s["ms"])

    return _run_transcription(step, init, hp_per_group, schedule, with_none)


def graves2013_transcription(hp_per_group, schedule=True, with_none=False):
    """Graves, "Generating Sequences With Recurrent Neural Networks", arXiv:1308.0850v5, §4,
    eqs. (38)-(41), p. 23 (eps_i = dL/dw_i):
        n_i = aleph n_i + (1 - aleph) eps_i^2                       (38)
        g_i = aleph g_i + (1 - aleph) eps_i                         (39)
        Delta_i = beth Delta_i - gimel eps_i / sqrt(n_i - g_i^2 + k)   (40)
        w_i = w_i + Delta_i                                          (41)
    with aleph = 0.95, beth = 0.9, gimel = 1e-4, k = 1e-4 (``lr`` replaces gimel when given).
    Initial n, g, Delta are not stated in the paper: zeros, as its re-implementations use."""
    def init(w, hp):
        return {"n": np.zeros_like(w), "g": np.zeros_like(w), "delta": np.zeros_like(w)}

    def step(w, e, s, hp):
        aleph, beth, gimel, k = 0.95, 0.9, hp.get("lr", 1e-4), 1e-4
        s["n"] = aleph * s["n"] + (1 - aleph) * e ** 2
        s["g"] = aleph * s["g"] + (1 - aleph) * e
        s["delta"] = beth * s["delta"] - gimel * e / np.sqrt(s["n"] - s["g"] ** 2 + k)
        return w + s["delta"]

    return _run_transcription(step, init, hp_per_group, schedule, with_none)


def _both_backends(preset: str, overrides: dict, group_overrides, ref: np.ndarray, rtol: float,
                   what: str, **run_kw) -> None:
    for name, run in BACKENDS.items():
        ours = run(preset, overrides, group_overrides, **run_kw)
        assert_trajectories_close(ours, ref, rtol, f"{what} [{name}]")


# ============================================================================================
# keras: keras.optimizers.RMSprop (Keras 3). Cases: (ours: global overrides, per-group
# overrides; Keras: constructor kwargs per group). Keras decays weights as p -= p*wd*lr before
# the step (decoupled); our preset maps weight_decay to the same.

KERAS_CASES = {
    "plain": ({}, ({}, {}), ({}, {})),
    "momentum": ({"momentum": 0.9}, ({}, {}), ({"momentum": 0.9},) * 2),
    "centered": ({"centered": True}, ({}, {}), ({"centered": True},) * 2),
    "momentum-centered-wd": (
        {"momentum": 0.8, "centered": True, "weight_decay": 0.5, "alpha": 0.95, "eps": 1e-6},
        ({}, {}),
        ({"momentum": 0.8, "centered": True, "weight_decay": 0.5, "rho": 0.95,
          "epsilon": 1e-6},) * 2),
    "groups-differ": (
        {},
        ({"momentum": 0.5, "weight_decay": 0.2}, {"centered": True, "alpha": 0.8}),
        ({"momentum": 0.5, "weight_decay": 0.2}, {"centered": True, "rho": 0.8})),
}


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_keras_preset_matches_keras3_float64(keras, case):
    """120 steps under an lr schedule (a Keras LearningRateSchedule; our group lr), two groups,
    float64 to 1e-12 (the lr values are exact in float32, the dtype of Keras's lr variable)."""
    ours_kw, ours_groups, keras_kw = KERAS_CASES[case]
    ref = run_keras(keras, keras_kw, dtype="float64")
    _both_backends("keras", ours_kw, ours_groups, ref, 1e-12, f"keras {case} float64")


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_keras_preset_matches_keras3_float32(keras, case):
    """The same runs in float32. Two float32 implementations that round in different places
    drift apart by about as much as each drifts from exact arithmetic, and the centered
    variant's ``v - m^2`` cancels badly in float32 (Keras's own float32 run is ~1e-5 off its
    float64 run there). So the tolerance is 2e-6 or three times Keras's own float32 error,
    whichever is larger, and ours must also be no farther from the float64 truth than that."""
    ours_kw, ours_groups, keras_kw = KERAS_CASES[case]
    ref32 = run_keras(keras, keras_kw, dtype="float32")
    ref64 = run_keras(keras, keras_kw, dtype="float64")
    tol = max(2e-6, 3 * float(_relative(ref32, ref64).max()))
    for name, run in BACKENDS.items():
        ours = run("keras", ours_kw, ours_groups, dtype="float32")
        assert_trajectories_close(ours, ref32, tol, f"keras {case} float32 [{name}]")
        assert_trajectories_close(ours, ref64, tol, f"keras {case} float32 vs float64 [{name}]")


def test_keras_preset_defaults_match_keras3_defaults_in_a_run(keras):
    """No overrides, constant lr: Keras's own defaults (learning_rate=0.001 held as float32)."""
    ref = run_keras(keras, ({}, {}), dtype="float32", schedule=False)
    _both_backends("keras", {}, ({}, {}), ref, 2e-6, "keras defaults", dtype="float32",
                   schedule=False)


# ============================================================================================
# optax: optax.rmsprop, float64 (jax x64). optax has no weight decay and no param groups.

# Each case is two param groups with different options (one jit compile per case is the cost
# that counts here, so every run checks two configurations): (ours, optax) per group.
OPTAX_CASES = {
    "default|momentum": (({}, {}), ({"momentum": 0.9}, {"momentum": 0.9})),
    "nesterov|centered": (({"momentum": 0.9, "nesterov": True},
                           {"momentum": 0.9, "nesterov": True}),
                          ({"centered": True}, {"centered": True})),
    "centered-momentum|initial_scale=1": (({"centered": True, "momentum": 0.7},
                                           {"centered": True, "momentum": 0.7}),
                                          ({"initial_square_avg": 1.0}, {"initial_scale": 1.0})),
    # centered + bias_correction: at step 1 v/c == (m/c)^2 == g^2 exactly, so the computed
    # variance is pure rounding noise (~1e-16 g^2, different in every implementation) and the
    # step is lr*g/sqrt(noise + eps); eps=1e-3 keeps that noise below 1e-12 of the step.
    "bias_correction|bias_correction-centered-nesterov": (
        ({"bias_correction": True}, {"bias_correction": True}),
        ({"bias_correction": True, "centered": True, "momentum": 0.9, "nesterov": True,
          "eps": 1e-3},
         {"bias_correction": True, "centered": True, "momentum": 0.9, "nesterov": True,
          "eps": 1e-3})),
    "eps_outside|initial_scale-bias_correction": (
        ({"eps_in_sqrt": False, "alpha": 0.99, "eps": 1e-3},
         {"eps_in_sqrt": False, "decay": 0.99, "eps": 1e-3}),
        ({"initial_square_avg": 0.5, "bias_correction": True, "momentum": 0.5},
         {"initial_scale": 0.5, "bias_correction": True, "momentum": 0.5})),
}


@pytest.mark.parametrize("case", list(OPTAX_CASES))
def test_optax_preset_matches_optax_rmsprop(optax, case):
    """120 steps, lr a schedule ``count -> lr`` in optax (group lr in ours), two param groups
    with different options, float64 to 1e-12."""
    (ours0, optax0), (ours1, optax1) = OPTAX_CASES[case]
    ref = run_optax(optax, (optax0, optax1))
    # lr is required by the preset; the schedule then sets each group's lr before every step.
    _both_backends("optax", {"lr": BASE_LR[0]}, (ours0, ours1), ref, 1e-12, f"optax {case}")


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_optax_centered_bias_correction_warns(backend):
    """The case above that combines centered and bias_correction (as optax allows) is run on
    purpose: building it warns that the first step is lr*g/eps."""
    import torch

    from rmsprop.numpy import RMSprop as NumpyRMSprop
    from rmsprop.torch import RMSprop as TorchRMSprop

    kw = {"lr": 0.01, "centered": True, "bias_correction": True}
    with pytest.warns(RuntimeWarning, match="centered=True with bias_correction=True"):
        if backend == "torch":
            TorchRMSprop.from_preset("optax", [torch.zeros(2, requires_grad=True)], **kw)
        else:
            NumpyRMSprop.from_preset("optax", [np.zeros(2)], **kw)


def test_optax_preset_matches_optax_rmsprop_constant_lr(optax):
    """A plain float learning_rate (no schedule), optax's other defaults."""
    ref = run_optax(optax, ({"learning_rate": 0.01},) * 2, schedule=False)
    for name, run in BACKENDS.items():
        ours = run("optax", {"lr": 0.01}, ({}, {}), schedule=False)
        assert_trajectories_close(ours, ref, 1e-12, f"optax constant lr [{name}]")


# ============================================================================================
# timm: RMSpropTF (timm/optim/rmsprop_tf.py), float64, real param groups, some grads None.

TIMM_CASES = {
    "momentum": ({"momentum": 0.9}, {"momentum": 0.9}),
    "momentum-lr-outside": ({"momentum": 0.9, "lr_in_momentum": False},
                            {"momentum": 0.9, "lr_in_momentum": False}),
    "centered-momentum": ({"centered": True, "momentum": 0.9},
                          {"centered": True, "momentum": 0.9}),
    "coupled-wd": ({"weight_decay": 0.1, "momentum": 0.5}, {"weight_decay": 0.1, "momentum": 0.5}),
    "decoupled-wd": ({"weight_decay": 0.5, "decoupled_weight_decay": True, "centered": True},
                     {"weight_decay": 0.5, "decoupled_decay": True, "centered": True}),
    "alpha-eps": ({"alpha": 0.99, "eps": 1e-6}, {"alpha": 0.99, "eps": 1e-6}),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_preset_matches_rmsproptf(RMSpropTF, case):
    """120 steps under an lr schedule, two groups, param 1 without a grad every 9th step."""
    ours_kw, timm_kw = TIMM_CASES[case]
    ref = run_timm(RMSpropTF, timm_kw, with_none=True)
    _both_backends("timm", ours_kw, ({}, {}), ref, 1e-12, f"timm {case}", with_none=True)


def test_timm_preset_matches_rmsproptf_groups_differ(RMSpropTF):
    group_kw = ({"momentum": 0.9, "weight_decay": 0.05},
                {"centered": True, "weight_decay": 0.3, "decoupled_decay": True})
    ours_groups = ({"momentum": 0.9, "weight_decay": 0.05},
                   {"centered": True, "weight_decay": 0.3, "decoupled_weight_decay": True})
    ref = run_timm(RMSpropTF, {}, group_kw, with_none=True)
    _both_backends("timm", {}, ours_groups, ref, 1e-12, "timm groups differ", with_none=True)


@pytest.mark.parametrize("overrides", [{}, {"lr": 0.016, "eps": 1e-3, "momentum": 0.9}],
                         ids=["defaults", "efficientnet"])
def test_timm_preset_defaults_and_efficientnet_recipe(RMSpropTF, overrides):
    """timm's own defaults, and the EfficientNet recipe (``--opt rmsproptf --opt-eps .001
    --momentum 0.9``, lr 0.016), at constant lr."""
    ref = run_timm(RMSpropTF, overrides, schedule=False, with_none=True)
    _both_backends("timm", overrides, ({}, {}), ref, 1e-12, f"timm {overrides}",
                   schedule=False, with_none=True)


# ============================================================================================
# tf1, hinton2012, graves2013: the transcriptions above, float64 to 1e-12.

TF1_CASES = {
    "plain": ({}, {"decay": 0.9, "momentum": 0.0, "epsilon": 1e-10}),
    "momentum": ({"momentum": 0.9}, {"decay": 0.9, "momentum": 0.9, "epsilon": 1e-10}),
    "centered-momentum": ({"centered": True, "momentum": 0.9},
                          {"decay": 0.9, "momentum": 0.9, "epsilon": 1e-10, "centered": True}),
    "decay-eps": ({"alpha": 0.99, "eps": 1e-3, "momentum": 0.5},
                  {"decay": 0.99, "momentum": 0.5, "epsilon": 1e-3}),
}


@pytest.mark.parametrize("case", list(TF1_CASES))
def test_tf1_preset_matches_apply_rmsprop_transcription(case):
    ours_kw, tf_hp = TF1_CASES[case]
    ref = tf1_transcription([tf_hp, tf_hp], with_none=True)
    # lr is required by the preset; the schedule overrides it per group before every step.
    _both_backends("tf1", {"lr": BASE_LR[0], **ours_kw}, ({}, {}), ref, 1e-12, f"tf1 {case}",
                   with_none=True)


def test_hinton2012_preset_matches_the_slide():
    ref = hinton2012_transcription([{}, {}], with_none=True)
    _both_backends("hinton2012", {"lr": BASE_LR[0]}, ({}, {}), ref, 1e-12, "hinton2012",
                   with_none=True)


@pytest.mark.parametrize("schedule", [False, True], ids=["paper-constants", "lr-schedule"])
def test_graves2013_preset_matches_eqs_38_to_41(schedule):
    ref = graves2013_transcription([{}, {}], schedule=schedule, with_none=True)
    _both_backends("graves2013", {}, ({}, {}), ref, 1e-12, f"graves2013 schedule={schedule}",
                   schedule=schedule, with_none=True)


# ============================================================================================
# Each preset's defaults are the original's, read from the original where it is installed.

def _effective(name: str) -> dict:
    """The option values a preset gives when nothing is overridden (the Options defaults fill
    whatever the preset leaves out)."""
    return {**rmsprop.Options().as_dict(), **rmsprop.PRESETS[name].options}


def _check_defaults(name: str, expected: dict) -> None:
    eff = _effective(name)
    for key, value in expected.items():
        assert eff[key] == value, f"preset {name!r}: {key} = {eff[key]!r}, original has {value!r}"
    # Both optimizers built from the bare preset hold the same values in their param group.
    import torch

    from rmsprop.numpy import RMSprop as NumpyRMSprop
    from rmsprop.torch import RMSprop as TorchRMSprop

    lr = {} if "lr" in expected else {"lr": 0.125}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "eps=0", RuntimeWarning)
        groups = [TorchRMSprop.from_preset(name, [torch.zeros(2, requires_grad=True)],
                                           **lr).param_groups[0],
                  NumpyRMSprop.from_preset(name, [np.zeros(2)], **lr).param_groups[0]]
    for group in groups:
        for key, value in {**expected, **lr}.items():
            assert group[key] == value, f"preset {name!r}: group {key} = {group[key]!r}"


def _signature_defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_pytorch_preset_defaults_are_torch_optim_rmsprop_defaults():
    import torch

    d = _signature_defaults(torch.optim.RMSprop)
    _check_defaults("pytorch", {"lr": d["lr"], "alpha": d["alpha"], "eps": d["eps"],
                                "weight_decay": d["weight_decay"], "momentum": d["momentum"],
                                "centered": d["centered"], "maximize": d["maximize"],
                                # torch.optim.RMSprop's rule (torch/optim/rmsprop.py): v0 = 0,
                                # eps outside the sqrt, lr applied after the buffer, L2 decay.
                                "initial_square_avg": 0.0, "eps_in_sqrt": False,
                                "lr_in_momentum": False, "decoupled_weight_decay": False,
                                "nesterov": False, "bias_correction": False})


def test_keras_preset_defaults_are_keras3_defaults(keras):
    d = _signature_defaults(keras.optimizers.RMSprop)
    assert d["weight_decay"] is None  # Keras: None means no decay
    _check_defaults("keras", {"lr": d["learning_rate"], "alpha": d["rho"], "eps": d["epsilon"],
                              "momentum": d["momentum"], "centered": d["centered"],
                              "weight_decay": 0.0,
                              # keras/src/optimizers/rmsprop.py: velocity starts at zeros,
                              # sqrt(v + epsilon), lr inside the momentum buffer, decoupled
                              # p -= p*wd*lr in BaseOptimizer._apply_weight_decay.
                              "initial_square_avg": 0.0, "eps_in_sqrt": True,
                              "lr_in_momentum": True, "decoupled_weight_decay": True,
                              "nesterov": False, "bias_correction": False, "maximize": False})


def test_optax_preset_defaults_are_optax_rmsprop_defaults(optax):
    _, optax_mod = optax
    sig = inspect.signature(optax_mod.rmsprop)
    assert sig.parameters["learning_rate"].default is inspect.Parameter.empty
    d = _signature_defaults(optax_mod.rmsprop)
    assert d["momentum"] is None  # optax: None means no trace()
    _check_defaults("optax", {"alpha": d["decay"], "eps": d["eps"],
                              "initial_square_avg": d["initial_scale"],
                              "eps_in_sqrt": d["eps_in_sqrt"], "centered": d["centered"],
                              "momentum": 0.0, "nesterov": d["nesterov"],
                              "bias_correction": d["bias_correction"],
                              # optax.trace after scale_by_learning_rate: lr inside the buffer;
                              # the alias has no weight decay.
                              "lr_in_momentum": True, "weight_decay": 0.0, "maximize": False})


def test_timm_preset_defaults_are_rmsproptf_defaults(RMSpropTF):
    d = _signature_defaults(RMSpropTF)
    _check_defaults("timm", {"lr": d["lr"], "alpha": d["alpha"], "eps": d["eps"],
                             "weight_decay": d["weight_decay"], "momentum": d["momentum"],
                             "centered": d["centered"],
                             "decoupled_weight_decay": d["decoupled_decay"],
                             "lr_in_momentum": d["lr_in_momentum"],
                             # timm/optim/rmsprop_tf.py: square_avg = ones_like(p),
                             # sqrt(square_avg + eps).
                             "initial_square_avg": 1.0, "eps_in_sqrt": True,
                             "nesterov": False, "bias_correction": False, "maximize": False})


def test_tf1_preset_defaults_are_rmspropoptimizer_defaults():
    # tensorflow/python/training/rmsprop.py: RMSPropOptimizer(learning_rate, decay=0.9,
    # momentum=0.0, epsilon=1e-10, use_locking=False, centered=False, name="RMSProp"); the
    # "rms" slot starts at ones; ApplyRMSProp puts epsilon inside the sqrt and lr inside "mom".
    _check_defaults("tf1", {"alpha": 0.9, "momentum": 0.0, "eps": 1e-10, "centered": False,
                            "initial_square_avg": 1.0, "eps_in_sqrt": True,
                            "lr_in_momentum": True, "weight_decay": 0.0})


def test_paper_presets_use_the_papers_constants():
    # Tieleman & Hinton 2012, lecture 6e: MeanSquare decay 0.9, no epsilon, no momentum.
    _check_defaults("hinton2012", {"alpha": 0.9, "eps": 0.0, "momentum": 0.0,
                                   "centered": False, "weight_decay": 0.0})
    # Graves 2013, p. 23: aleph = 0.95, beth = 0.9, gimel = 1e-4, k = 1e-4 (inside the sqrt,
    # gimel inside Delta), centered (eqs. 38-40).
    _check_defaults("graves2013", {"lr": 1e-4, "alpha": 0.95, "momentum": 0.9, "eps": 1e-4,
                                   "centered": True, "eps_in_sqrt": True, "lr_in_momentum": True,
                                   "weight_decay": 0.0})


def test_hinton2012_preset_warns_that_eps_is_zero():
    """The slide has no epsilon; the preset keeps it at 0 and says what that risks."""
    import torch

    from rmsprop.torch import RMSprop

    with pytest.warns(RuntimeWarning, match="eps=0"):
        RMSprop.from_preset("hinton2012", [torch.zeros(2, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize("name", ["tf1", "optax", "hinton2012"])
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_presets_without_a_default_lr_require_lr(name, backend):
    """The originals have no default learning rate (TF1's RMSPropOptimizer(learning_rate, ...),
    optax.rmsprop(learning_rate, ...), the slide gives none): from_preset without lr raises."""
    import torch

    from rmsprop.numpy import RMSprop as NumpyRMSprop
    from rmsprop.torch import RMSprop as TorchRMSprop

    assert rmsprop.PRESETS[name].lr_required
    assert "lr" not in rmsprop.PRESETS[name].options
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "eps=0", RuntimeWarning)
        with pytest.raises(ValueError, match="lr"):
            if backend == "torch":
                TorchRMSprop.from_preset(name, [torch.zeros(2, requires_grad=True)])
            else:
                NumpyRMSprop.from_preset(name, [np.zeros(2)])
        # ...and works as soon as lr is given.
        if backend == "torch":
            TorchRMSprop.from_preset(name, [torch.zeros(2, requires_grad=True)], lr=0.5)
        else:
            NumpyRMSprop.from_preset(name, [np.zeros(2)], lr=0.5)


# ============================================================================================
# The torch optimizer's foreach and for-loop paths against each original (the grid above runs
# the default path), on the richest case of each preset.

def _richest_case(preset: str, request) -> tuple[dict, Sequence[dict], np.ndarray, dict]:
    """(our overrides, our per-group overrides, the original's trajectory, run options)."""
    if preset == "keras":
        ours, groups, keras_kw = KERAS_CASES["momentum-centered-wd"]
        return ours, groups, run_keras(request.getfixturevalue("keras"), keras_kw,
                                       dtype="float64"), {}
    if preset == "optax":
        (ours0, optax0), (ours1, optax1) = OPTAX_CASES[
            "bias_correction|bias_correction-centered-nesterov"]
        ref = run_optax(request.getfixturevalue("optax"), (optax0, optax1))
        return {"lr": BASE_LR[0]}, (ours0, ours1), ref, {}
    if preset == "timm":
        timm_groups = ({"momentum": 0.9, "weight_decay": 0.05},
                       {"centered": True, "weight_decay": 0.3, "decoupled_decay": True})
        ours_groups = ({"momentum": 0.9, "weight_decay": 0.05},
                       {"centered": True, "weight_decay": 0.3, "decoupled_weight_decay": True})
        ref = run_timm(request.getfixturevalue("RMSpropTF"), {}, timm_groups, with_none=True)
        return {}, ours_groups, ref, {"with_none": True}
    if preset == "tf1":
        ours, tf_hp = TF1_CASES["centered-momentum"]
        ref = tf1_transcription([tf_hp, tf_hp], with_none=True)
        return {"lr": BASE_LR[0], **ours}, ({}, {}), ref, {"with_none": True}
    if preset == "hinton2012":
        ref = hinton2012_transcription([{}, {}], with_none=True)
        return {"lr": BASE_LR[0]}, ({}, {}), ref, {"with_none": True}
    if preset == "dqn2015":
        hp = {"wc": 0.05}
        return ({"weight_decay": 0.05}, ({}, {}), dqn2015_transcription([hp, hp], with_none=True),
                {"with_none": True})
    if preset == "sb3":
        ours, sb3_kw = SB3_CASES["centered-momentum-wd"]
        return ours, ({}, {}), sb3_transcription([sb3_kw, sb3_kw], with_none=True), {
            "with_none": True}
    assert preset == "graves2013"
    return {}, ({}, {}), graves2013_transcription([{}, {}], with_none=True), {"with_none": True}


@pytest.mark.parametrize("preset", ["keras", "optax", "timm", "tf1", "hinton2012", "graves2013",
                                    "dqn2015", "sb3"])
def test_every_torch_path_matches_the_original(preset, request):
    ours, groups, ref, run_kw = _richest_case(preset, request)
    for path, flags in TORCH_PATHS.items():
        traj = run_ours_torch(preset, ours, groups, path=flags, **run_kw)
        assert_trajectories_close(traj, ref, 1e-12, f"{preset} [torch {path}]")


# ============================================================================================
# dqn2015: DeepMind's DQN (Mnih et al., Nature 2015), transcribed from its Lua code.

def dqn2015_transcription(hp_per_group, schedule=True, with_none=False):
    """nql:qLearnMinibatch in dqn/NeuralQLearner.lua (github.com/deepmind/dqn, commit 9d9b1d1),
    float64. ``network:backward(s, targets)`` with targets = the TD error r + gamma max Q' - Q,
    i.e. minus dL/dQ of L = delta^2/2, so ``dw`` is the *negated* loss gradient:
        dw:add(-wc, w)                              -- L2 weight cost (wc = 0 in run_gpu)
        g:mul(0.95):add(0.05, dw)
        tmp:cmul(dw, dw);  g2:mul(0.95):add(0.05, tmp)
        tmp:cmul(g, g);  tmp:mul(-1);  tmp:add(g2);  tmp:add(0.01);  tmp:sqrt()
        deltas:mul(0):addcdiv(lr, dw, tmp)
        w:add(deltas)
    g, g2 and deltas start at zeros (``dw:clone():fill(0)``); lr = 0.00025 (run_gpu;
    lr_end = lr, so it stays constant) unless the schedule sets it."""
    def init(w, hp):
        return {"g": np.zeros_like(w), "g2": np.zeros_like(w), "deltas": np.zeros_like(w)}

    def step(w, grad, s, hp):
        dw = -grad
        dw = dw + (-hp.get("wc", 0.0)) * w
        s["g"] = s["g"] * 0.95 + 0.05 * dw
        s["g2"] = s["g2"] * 0.95 + 0.05 * (dw * dw)
        tmp = np.sqrt(-(s["g"] * s["g"]) + s["g2"] + 0.01)
        s["deltas"] = s["deltas"] * 0 + hp.get("lr", 0.00025) * dw / tmp
        return w + s["deltas"]

    return _run_transcription(step, init, hp_per_group, schedule, with_none)


@pytest.mark.parametrize("case", ["paper", "lr-schedule", "weight-cost"])
def test_dqn2015_preset_matches_neuralqlearner_lua(case):
    """The preset alone (lr 2.5e-4 constant), under an lr schedule, and with the Lua weight
    cost ``wc`` as our ``weight_decay``: float64 to 1e-12."""
    hp = {"wc": 0.1} if case == "weight-cost" else {}
    ours = {"weight_decay": 0.1} if case == "weight-cost" else {}
    schedule = case != "paper"
    ref = dqn2015_transcription([hp, hp], schedule=schedule, with_none=True)
    _both_backends("dqn2015", ours, ({}, {}), ref, 1e-12, f"dqn2015 {case}",
                   schedule=schedule, with_none=True)


def test_dqn2015_preset_uses_the_papers_constants():
    # Mnih et al. 2015, Extended Data Table 1: learning rate 0.00025, gradient momentum 0.95,
    # squared gradient momentum 0.95, min squared gradient 0.01 (added inside the sqrt of the
    # centered second moment in NeuralQLearner.lua); no momentum on the update (deltas:mul(0)).
    _check_defaults("dqn2015", {"lr": 2.5e-4, "alpha": 0.95, "eps": 0.01, "centered": True,
                                "eps_in_sqrt": True, "momentum": 0.0, "initial_square_avg": 0.0,
                                "weight_decay": 0.0, "decoupled_weight_decay": False})


def test_dqn2015_coincides_with_graves2013_without_momentum():
    """The presets table says so: dqn2015 is graves2013 with momentum 0, eps 0.01, lr 2.5e-4."""
    ref = dqn2015_transcription([{}, {}], schedule=False, with_none=True)
    for name, run in BACKENDS.items():
        ours = run("graves2013", {"momentum": 0.0, "eps": 0.01, "lr": 2.5e-4}, ({}, {}),
                   schedule=False, with_none=True)
        assert_trajectories_close(ours, ref, 1e-12, f"graves2013 as dqn2015 [{name}]")


# ============================================================================================
# sb3: Stable-Baselines3's RMSpropTFLike, from its file (it imports only torch), and a
# transcription of that file for machines without SB3.

def load_sb3_rmsprop_tf_like():
    """SB3's ``RMSpropTFLike``: ``(class, None)`` or ``(None, reason)``; the package itself is
    not imported (its ``__init__`` pulls gymnasium and every algorithm)."""
    spec = importlib.util.find_spec("stable_baselines3")
    if spec is None or not spec.submodule_search_locations:
        return None, "stable-baselines3 is not installed"
    path = os.path.join(list(spec.submodule_search_locations)[0], "common", "sb2_compat",
                        "rmsprop_tf_like.py")
    if not os.path.exists(path):
        return None, f"stable-baselines3 has no {path}"
    file_spec = importlib.util.spec_from_file_location("_rmsprop_peer_sb3_rmsprop_tf_like", path)
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception as exc:  # pragma: no cover - depends on the SB3 version
        return None, f"{path} cannot be loaded: {exc!r}"
    return module.RMSpropTFLike, None


@pytest.fixture(scope="module")
def RMSpropTFLike():
    cls, reason = load_sb3_rmsprop_tf_like()
    if cls is None:
        pytest.skip(reason)
    return cls


def sb3_transcription(hp_per_group, schedule=True, with_none=False):
    """RMSpropTFLike.step (stable_baselines3/common/sb2_compat/rmsprop_tf_like.py, SB3 2.9.2):
        square_avg starts at ones, momentum_buffer and grad_avg at zeros
        grad = grad + weight_decay * p                         [weight_decay != 0]
        square_avg = alpha * square_avg + (1 - alpha) * grad^2
        grad_avg = alpha * grad_avg + (1 - alpha) * grad          [centered]
        avg = sqrt(square_avg - grad_avg^2 + eps)   [centered; else sqrt(square_avg + eps)]
        buf = momentum * buf + grad / avg;  p -= lr * buf       [momentum > 0]
        p -= lr * grad / avg                                    [momentum = 0]
    Defaults lr=1e-2, alpha=0.99, eps=1e-8."""
    def init(p, hp):
        return {"sq": np.ones_like(p), "ga": np.zeros_like(p), "buf": np.zeros_like(p)}

    def step(p, grad, s, hp):
        lr, alpha, eps = hp.get("lr", 1e-2), hp.get("alpha", 0.99), hp.get("eps", 1e-8)
        mom, wd = hp.get("momentum", 0.0), hp.get("weight_decay", 0.0)
        if wd != 0:
            grad = grad + wd * p
        s["sq"] = s["sq"] * alpha + (1 - alpha) * grad * grad
        if hp.get("centered", False):
            s["ga"] = s["ga"] * alpha + (1 - alpha) * grad
            avg = np.sqrt(s["sq"] - s["ga"] * s["ga"] + eps)
        else:
            avg = np.sqrt(s["sq"] + eps)
        if mom > 0:
            s["buf"] = s["buf"] * mom + grad / avg
            return p - lr * s["buf"]
        return p - lr * grad / avg

    return _run_transcription(step, init, hp_per_group, schedule, with_none)


def run_sb3(RMSpropTFLike, kwargs: dict, schedule: bool = True,
            with_none: bool = False) -> np.ndarray:
    import torch

    params = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in INIT]
    groups = _group_dicts(lambda i: params[i], ({}, {}))
    if schedule:
        for k, g in enumerate(groups):
            g["lr"] = lr_at(0, k)
    opt = RMSpropTFLike(groups, **kwargs)
    return _drive_torch(opt, params, torch.float64, schedule, with_none)


# (ours, SB3's kwargs); the same names in both, as SB3 keeps torch's.
SB3_CASES = {
    "plain": ({}, {}),
    "momentum": ({"momentum": 0.9}, {"momentum": 0.9}),
    "centered-momentum-wd": ({"centered": True, "momentum": 0.9, "weight_decay": 0.05},
                             {"centered": True, "momentum": 0.9, "weight_decay": 0.05}),
    "a2c-eps": ({"eps": 1e-5, "alpha": 0.99}, {"eps": 1e-5, "alpha": 0.99}),
    "centered-alpha": ({"centered": True, "alpha": 0.9, "eps": 1e-6},
                       {"centered": True, "alpha": 0.9, "eps": 1e-6}),
}


@pytest.mark.parametrize("case", list(SB3_CASES))
def test_sb3_preset_matches_rmsproptflike(RMSpropTFLike, case):
    """SB3's own class: 120 steps under an lr schedule (where a buffer of ``g/d`` with lr after
    differs from TF1's ``lr*g/d``), two groups, param 1 without a grad every 9th step."""
    ours_kw, sb3_kw = SB3_CASES[case]
    ref = run_sb3(RMSpropTFLike, sb3_kw, with_none=True)
    _both_backends("sb3", ours_kw, ({}, {}), ref, 1e-12, f"sb3 {case}", with_none=True)
    # the transcription below is faithful to the file it transcribes
    assert_trajectories_close(sb3_transcription([sb3_kw, sb3_kw], with_none=True), ref, 1e-12,
                              f"sb3 transcription {case}")


@pytest.mark.parametrize("case", list(SB3_CASES))
def test_sb3_preset_matches_rmsproptflike_transcription(case):
    ours_kw, sb3_kw = SB3_CASES[case]
    ref = sb3_transcription([sb3_kw, sb3_kw], with_none=True)
    _both_backends("sb3", ours_kw, ({}, {}), ref, 1e-12, f"sb3 transcription {case}",
                   with_none=True)


def test_sb3_preset_defaults_are_rmsproptflike_defaults(RMSpropTFLike):
    d = _signature_defaults(RMSpropTFLike)
    _check_defaults("sb3", {"lr": d["lr"], "alpha": d["alpha"], "eps": d["eps"],
                            "weight_decay": d["weight_decay"], "momentum": d["momentum"],
                            "centered": d["centered"],
                            # rmsprop_tf_like.py: square_avg = ones_like(p), avg =
                            # sqrt(square_avg + eps), buf = momentum*buf + grad/avg, p -= lr*buf.
                            "initial_square_avg": 1.0, "eps_in_sqrt": True,
                            "lr_in_momentum": False, "decoupled_weight_decay": False,
                            "nesterov": False, "bias_correction": False, "maximize": False})


def test_sb3_coincides_with_tf1_at_constant_lr_and_differs_under_a_schedule():
    """What the presets table says: with TF1's alpha and eps, sb3 is TF1's rule at a constant
    lr (``lr*g/d`` in the buffer and ``g/d`` times lr after are the same sums); once lr decays
    with momentum 0.9 they part (the buffer keeps old steps at their old lr in TF1)."""
    hp = {"decay": 0.9, "momentum": 0.9, "epsilon": 1e-10, "lr": 0.01}
    ref = tf1_transcription([hp, hp], schedule=False, with_none=True)
    for name, run in BACKENDS.items():
        ours = run("sb3", {"alpha": 0.9, "eps": 1e-10, "momentum": 0.9}, ({}, {}),
                   schedule=False, with_none=True)
        assert_trajectories_close(ours, ref, 1e-12, f"sb3 as tf1, constant lr [{name}]")
    sb3 = sb3_transcription([{"alpha": 0.9, "eps": 1e-10, "momentum": 0.9}] * 2)
    tf1 = tf1_transcription([hp, hp])
    assert _relative(sb3, tf1).max() > 1e-3


def test_sb3_rmsproptflike_is_timm_rmsproptf_with_lr_outside_the_buffer(RMSpropTFLike, RMSpropTF):
    """The two originals against each other (the presets table's claim): SB3's class is timm's
    with ``lr_in_momentum=False`` at SB3's alpha and eps."""
    kw = {"momentum": 0.9, "centered": True, "weight_decay": 0.05}
    sb3 = run_sb3(RMSpropTFLike, kw, with_none=True)
    timm = run_timm(RMSpropTF, {**kw, "alpha": 0.99, "eps": 1e-8, "lr_in_momentum": False},
                    with_none=True)
    assert_trajectories_close(sb3, timm, 1e-12, "sb3 vs timm lr_in_momentum=False")
