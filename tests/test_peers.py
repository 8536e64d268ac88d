"""Every non-torch preset against its original: the peer library itself, or a transcription.

Oracles (never our own code):

* ``keras``: Keras 3's ``keras.optimizers.RMSprop`` run on the torch backend;
* ``optax``: ``optax.rmsprop`` (jax, float64 via ``jax.enable_x64``);
* ``timm``: timm's ``RMSpropTF``, loaded from ``timm/optim/rmsprop_tf.py`` by file path (the
  ``timm`` package itself needs torchvision, which this project does not install);
* ``tf1``, ``hinton2012``, ``graves2013``: NumPy transcriptions written here from the original
  equations (cited at each one), independent of :mod:`rmsprop.spec`.

Each comparison runs both ``rmsprop.torch.RMSprop.from_preset`` and
``rmsprop.numpy.RMSprop.from_preset`` for 120 steps on a small noisy quadratic (three params
including a matrix, two param groups, an lr schedule that changes lr mid-run so that
``lr_in_momentum`` matters) and compares the params after every step.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
import types
import warnings
from typing import Any, Callable, Sequence

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


def lr_at(t: int, group: int, base: Sequence[float] = BASE_LR) -> float:
    return base[group] * SCHEDULE[t]


def assert_trajectories_close(ours: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    """Params after every step agree to ``rtol`` relative (params are O(1), so the same as an
    absolute floor)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.all(np.isfinite(ref)), f"{what}: the oracle itself went non-finite"
    err = np.abs(ours - ref) / (np.abs(ref) + 1.0)
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
                   dtype: str = "float64", schedule: bool = True, with_none: bool = False,
                   base_lr: Sequence[float] = BASE_LR) -> np.ndarray:
    """``rmsprop.torch.RMSprop.from_preset(preset, groups, **overrides)``; with ``schedule`` the
    group lr is set to ``lr_at(t, group)`` before step ``t``."""
    import torch
    from rmsprop.torch import RMSprop

    tdtype = getattr(torch, dtype)
    params = [torch.tensor(p, dtype=tdtype, requires_grad=True) for p in INIT]
    groups = _group_dicts(lambda i: params[i], group_overrides)
    if schedule:
        for k, g in enumerate(groups):
            g["lr"] = lr_at(0, k, base_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # hinton2012's eps=0 warning
        opt = RMSprop.from_preset(preset, groups, **overrides)
    traj = np.empty((STEPS, sum(p.numel() for p in params)))
    for t in range(STEPS):
        if schedule:
            for k, g in enumerate(opt.param_groups):
                g["lr"] = lr_at(t, k, base_lr)
        grads = grads_at(t, [p.detach().numpy() for p in params], with_none)
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.tensor(g, dtype=tdtype)
        opt.step()
        traj[t] = _flat([p.detach().numpy() for p in params])
    return traj


def run_ours_numpy(preset: str, overrides: dict, group_overrides: Sequence[dict] = ({}, {}),
                   dtype: str = "float64", schedule: bool = True, with_none: bool = False,
                   base_lr: Sequence[float] = BASE_LR) -> np.ndarray:
    """``rmsprop.numpy.RMSprop.from_preset(preset, groups, **overrides)``; ``.step(grads)``
    updates the arrays in place."""
    from rmsprop.numpy import RMSprop

    arrays = [p.astype(dtype) for p in INIT]
    groups = _group_dicts(lambda i: arrays[i], group_overrides)
    if schedule:
        for k, g in enumerate(groups):
            g["lr"] = lr_at(0, k, base_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt = RMSprop.from_preset(preset, groups, **overrides)
    traj = np.empty((STEPS, sum(a.size for a in arrays)))
    for t in range(STEPS):
        if schedule:
            for k, g in enumerate(opt.param_groups):
                g["lr"] = lr_at(t, k, base_lr)
        opt.step(grads_at(t, arrays, with_none))
        traj[t] = _flat(arrays)
    return traj


BACKENDS = {"torch": run_ours_torch, "numpy": run_ours_numpy}


# --------------------------------------------------------------------------------------------
# Keras 3 (torch backend). The backend is fixed when keras is first imported, so the variables
# are set only around that import and restored at once: nothing leaks into other tests.

@pytest.fixture(scope="module")
def keras(tmp_path_factory):
    mod = sys.modules.get("keras")
    if mod is None:
        saved = {k: os.environ.get(k) for k in ("KERAS_BACKEND", "KERAS_HOME")}
        os.environ["KERAS_BACKEND"] = "torch"
        # Keras writes keras.json under KERAS_HOME on first import: keep it out of $HOME.
        os.environ["KERAS_HOME"] = str(tmp_path_factory.mktemp("keras_home"))
        try:
            mod = importlib.import_module("keras")
        except Exception as exc:  # pragma: no cover - depends on the environment
            pytest.skip(f"keras cannot be imported: {exc!r}")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if mod.config.backend() != "torch":  # pragma: no cover - keras imported elsewhere first
        pytest.skip(f"keras was already imported with backend {mod.config.backend()!r}")
    return mod


def run_keras(keras, kwargs_per_group: Sequence[dict], dtype: str = "float32",
              schedule: bool = True) -> np.ndarray:
    """One ``keras.optimizers.RMSprop`` per param group (Keras has no param groups; separate
    optimizers on disjoint variables are what groups mean). With ``schedule`` the lr is a
    ``LearningRateSchedule`` returning ``lr_at(iterations, group)``."""

    class Table(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, group: int):
            self.group = group

        def __call__(self, step):
            return lr_at(int(keras.ops.convert_to_numpy(step)), self.group)

    variables = [keras.Variable(p.astype(dtype), dtype=dtype) for p in INIT]
    opts = []
    for k, kw in enumerate(kwargs_per_group):
        kw = dict(kw)
        if schedule:
            kw["learning_rate"] = Table(k)
        opts.append(keras.optimizers.RMSprop(**kw))
    traj = np.empty((STEPS, sum(p.size for p in INIT)))
    for t in range(STEPS):
        current = [keras.ops.convert_to_numpy(v) for v in variables]
        grads = grads_at(t, current)
        for k, opt in enumerate(opts):
            pairs = [(keras.ops.convert_to_tensor(grads[i].astype(dtype)), variables[i])
                     for i in range(len(INIT)) if GROUP_OF[i] == k]
            opt.apply_gradients(pairs)
        traj[t] = _flat([keras.ops.convert_to_numpy(v) for v in variables])
    return traj


# --------------------------------------------------------------------------------------------
# optax (float64 inside jax.enable_x64, restored afterwards).

@pytest.fixture(scope="module")
def optax():
    jax = pytest.importorskip("jax", reason="jax is not installed")
    return jax, pytest.importorskip("optax", reason="optax is not installed")


def run_optax(optax, kwargs: dict, dtype: str = "float64", schedule: bool = True,
              group: int = 0) -> np.ndarray:
    """``optax.rmsprop(**kwargs)`` on all params, its lr a schedule ``count -> lr_at(count,
    group)`` (one param group: optax has none; per-group runs are separate transformations)."""
    jax, optax = optax
    import jax.numpy as jnp

    with jax.enable_x64(dtype == "float64"):
        kw = dict(kwargs)
        if schedule:
            table = jnp.asarray([lr_at(t, group) for t in range(STEPS)], dtype=dtype)
            kw["learning_rate"] = lambda count: table[count]
        tx = optax.rmsprop(**kw)
        params = [jnp.asarray(p, dtype=dtype) for p in INIT]
        state = tx.init(params)
        update = jax.jit(tx.update)
        traj = np.empty((STEPS, sum(p.size for p in INIT)))
        for t in range(STEPS):
            grads = [jnp.asarray(g, dtype=dtype) for g in grads_at(t, [np.asarray(p) for p in params])]
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
            traj[t] = _flat([np.asarray(p) for p in params])
    return traj


# --------------------------------------------------------------------------------------------
# timm's RMSpropTF, from its file: a throwaway package whose __path__ is timm/optim, so the
# file's relative imports (._helpers, ._types) resolve without running timm/__init__.py
# (which imports torchvision).

@pytest.fixture(scope="module")
def RMSpropTF():
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    optim_dir = os.path.join(list(spec.submodule_search_locations)[0], "optim")
    if not os.path.exists(os.path.join(optim_dir, "rmsprop_tf.py")):
        pytest.skip(f"timm has no optim/rmsprop_tf.py under {optim_dir}")
    pkg_name = "_rmsprop_peer_timm_optim"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [optim_dir]
    sys.modules[pkg_name] = pkg
    try:
        module = importlib.import_module(f"{pkg_name}.rmsprop_tf")
    except Exception as exc:  # pragma: no cover - depends on the timm version
        pytest.skip(f"timm/optim/rmsprop_tf.py cannot be loaded: {exc!r}")
    finally:
        for name in [n for n in sys.modules if n == pkg_name or n.startswith(pkg_name + ".")]:
            del sys.modules[name]
    return module.RMSpropTF


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
