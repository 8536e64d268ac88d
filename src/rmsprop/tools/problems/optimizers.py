"""The optimizers ``rmsprop compare`` and ``rmsprop tune`` know by name, with search spaces.

An :class:`OptimizerSpec` is a factory ``factory(params, **hp)``, its library defaults (the
"one-shot" configuration of Schmidt et al. 2021) and a search space. Search-space entries are
tuples, the first item naming the scale:

- ``("log", lo, hi)``: log-uniform in ``[lo, hi]`` (learning rates);
- ``("log1m", lo, hi)``: ``1 - value`` log-uniform, value in ``[lo, hi]`` (decay rates: RMSProp's
  ``alpha``, Adam's ``beta2``; AlgoPerf's ``one_minus_beta1`` convention);
- ``("uniform", lo, hi)``; ``("choice", v1, v2, ...)``.

Use :func:`sample` (Latin-hypercube / random) and :func:`grid` to draw configurations.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OptimizerSpec", "OPTIMIZERS", "OursUnavailableError", "resolve", "ours_available", "sample",
    "grid", "to_unit", "from_unit", "on_edge", "with_schedule", "SCHEDULES",
]

#: learning-rate schedules :func:`with_schedule` can attach
SCHEDULES = ("constant", "cosine")


@dataclass
class OptimizerSpec:
    """A named optimizer: ``factory(params, **hp)``, ``defaults`` and ``search_space``.

    ``ours`` marks the entries that are :class:`rmsprop.torch.RMSprop`: they refuse to resolve
    when it does not import, rather than run another optimizer under its name. ``accepts``
    names further keyword arguments of the factory that ``rmsprop tune --tune`` may search
    (``momentum``, ``weight_decay``), off by default.
    """

    name: str
    factory: Callable[..., Any] = field(repr=False)
    defaults: dict[str, Any]
    search_space: dict[str, tuple]
    description: str = ""
    ours: bool = False
    accepts: tuple[str, ...] = ()

    def make(self, params: Sequence[Any], **hp: Any) -> Any:
        """Build the optimizer with ``defaults`` overridden by ``hp``."""
        return self.factory(params, **{**self.defaults, **hp})


class OursUnavailableError(ImportError):
    """``rmsprop.torch.RMSprop`` does not import, so no ``rmsprop*`` optimizer can run."""


def _import_error() -> str | None:
    """Why ``rmsprop.torch.RMSprop`` cannot be imported, or ``None`` when it can."""
    try:
        from rmsprop.torch import RMSprop  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _ours() -> Any:
    """Our ``rmsprop.torch.RMSprop``; :class:`OursUnavailableError` when it does not import.

    Never ``torch.optim.RMSprop`` in its place: a comparison labelled ``rmsprop`` must measure
    this library's optimizer, or nothing.
    """
    try:
        from rmsprop.torch import RMSprop
    except ImportError as e:
        raise OursUnavailableError(_unavailable_message("rmsprop", f"{type(e).__name__}: {e}")
                                   ) from e
    return RMSprop


def _unavailable_message(name: str, why: str) -> str:
    return (f"optimizer {name!r} is rmsprop.torch.RMSprop, which does not import ({why}); "
            "torch.optim.RMSprop is never run in its place: reinstall rmsprop with its torch "
            "extra, or use 'torch-rmsprop'")


def ours_available() -> bool:
    """Whether :class:`rmsprop.torch.RMSprop` imports (the ``rmsprop*`` entries can run)."""
    return _import_error() is None


def _rmsprop(params: Any, **hp: Any) -> Any:
    return _ours()(params, **hp)


def _torch_rmsprop(params: Any, **hp: Any) -> Any:
    import torch

    return torch.optim.RMSprop(params, **hp)


def _adam(params: Any, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, **hp: Any) -> Any:
    import torch

    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps, **hp)


def _sgd(params: Any, **hp: Any) -> Any:
    import torch

    return torch.optim.SGD(params, **hp)


_LR_ADAPTIVE = ("log", 1e-4, 1.0)
_ALPHA = ("log1m", 0.9, 0.9999)
_RMS_DEFAULTS = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8}
_RMS_ACCEPTS = ("momentum", "weight_decay")

OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in [
        OptimizerSpec("rmsprop", _rmsprop, dict(_RMS_DEFAULTS),
                      {"lr": _LR_ADAPTIVE, "alpha": _ALPHA},
                      "rmsprop.torch.RMSprop, PyTorch defaults",
                      ours=True, accepts=_RMS_ACCEPTS),
        OptimizerSpec("rmsprop-centered", _rmsprop, {**_RMS_DEFAULTS, "centered": True},
                      {"lr": _LR_ADAPTIVE, "alpha": _ALPHA},
                      "rmsprop.torch.RMSprop(centered=True) (Graves 2013)",
                      ours=True, accepts=_RMS_ACCEPTS),
        OptimizerSpec("rmsprop-momentum", _rmsprop, {**_RMS_DEFAULTS, "momentum": 0.9},
                      {"lr": _LR_ADAPTIVE, "alpha": _ALPHA},
                      "rmsprop.torch.RMSprop(momentum=0.9)",
                      ours=True, accepts=_RMS_ACCEPTS),
        OptimizerSpec("rmsprop-8bit", _rmsprop, {**_RMS_DEFAULTS, "state_dtype": "8bit"},
                      {"lr": _LR_ADAPTIVE, "alpha": _ALPHA},
                      "RMSprop (8-bit state): rmsprop.torch.RMSprop(state_dtype='8bit')",
                      ours=True, accepts=_RMS_ACCEPTS),
        OptimizerSpec("rmsprop-4bit", _rmsprop, {**_RMS_DEFAULTS, "state_dtype": "4bit"},
                      {"lr": _LR_ADAPTIVE, "alpha": _ALPHA},
                      "RMSprop (4-bit state): rmsprop.torch.RMSprop(state_dtype='4bit')",
                      ours=True, accepts=_RMS_ACCEPTS),
        OptimizerSpec("torch-rmsprop", _torch_rmsprop, dict(_RMS_DEFAULTS),
                      {"lr": _LR_ADAPTIVE, "alpha": _ALPHA},
                      "torch.optim.RMSprop (cross-check: must coincide with rmsprop)",
                      accepts=_RMS_ACCEPTS),
        OptimizerSpec("adam", _adam, {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
                      {"lr": _LR_ADAPTIVE, "beta2": _ALPHA}, "torch.optim.Adam",
                      accepts=("weight_decay",)),
        OptimizerSpec("sgd", _sgd, {"lr": 1e-3}, {"lr": ("log", 1e-4, 10.0)},
                      "torch.optim.SGD, no momentum",
                      accepts=("momentum", "weight_decay")),
        OptimizerSpec("sgd-momentum", _sgd, {"lr": 1e-3, "momentum": 0.9},
                      {"lr": ("log", 1e-4, 1.0)}, "torch.optim.SGD(momentum=0.9)",
                      accepts=("weight_decay",)),
    ]
}


def resolve(name_or_path: str) -> OptimizerSpec:
    """A registered name, or ``"pkg.module:Class"`` naming any ``torch.optim.Optimizer``.

    For an import path the defaults are the class's float keyword defaults (``lr`` = 1e-3 when it
    has none) and the search space is the learning rate, log-uniform in [1e-4, 1].
    Raises ``ValueError`` with the valid names when it cannot resolve, and for our own entries
    when :class:`rmsprop.torch.RMSprop` does not import.
    """
    if name_or_path in OPTIMIZERS:
        spec = OPTIMIZERS[name_or_path]
        if spec.ours:
            why = _import_error()
            if why is not None:
                raise ValueError(_unavailable_message(name_or_path, why))
        return spec
    if ":" not in name_or_path:
        raise ValueError(f"unknown optimizer {name_or_path!r}; valid optimizers: "
                         f"{', '.join(OPTIMIZERS)}, or an import path 'pkg.module:Class'")
    from rmsprop.tools.user_problem import cwd_on_path

    mod_name, _, attr = name_or_path.partition(":")
    cwd_on_path()
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import optimizer {name_or_path!r}: {e}") from None
    import torch

    if not (inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)):
        raise ValueError(f"{name_or_path!r} is not a torch.optim.Optimizer subclass")
    defaults: dict[str, float] = {}
    numeric = []
    for pname, prm in inspect.signature(obj).parameters.items():
        d = prm.default
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            numeric.append(pname)
            if isinstance(d, float):
                defaults[pname] = d
    defaults.setdefault("lr", 1e-3)
    build: Any = obj  # (its signature is the user's, not Optimizer's)
    try:  # a class that cannot be built with its defaults would fail in every run, mid-way
        build([torch.nn.Parameter(torch.zeros(1))], **defaults)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"optimizer {name_or_path!r} cannot be built with "
                         f"{', '.join(f'{k}={v:g}' for k, v in defaults.items())}: "
                         f"{type(e).__name__}: {e}") from None
    return OptimizerSpec(name_or_path, obj, defaults, {"lr": _LR_ADAPTIVE}, f"{obj.__module__}."
                         f"{obj.__qualname__}", accepts=tuple(numeric))


# -- search-space helpers ------------------------------------------------------------------------

def from_unit(entry: tuple, u: float) -> Any:
    """Map ``u`` in [0, 1] to a value of the search-space ``entry`` (monotone, increasing)."""
    kind = entry[0]
    if kind == "log":
        lo, hi = math.log(entry[1]), math.log(entry[2])
        return math.exp(lo + u * (hi - lo))
    if kind == "log1m":
        # u=0 -> lo, u=1 -> hi, with 1-value log-uniform
        a, b = math.log(1 - entry[1]), math.log(1 - entry[2])
        return 1 - math.exp(a + u * (b - a))
    if kind == "uniform":
        return entry[1] + u * (entry[2] - entry[1])
    if kind == "choice":
        opts = entry[1:]
        return opts[min(int(u * len(opts)), len(opts) - 1)]
    raise ValueError(f"unknown search-space scale {kind!r} in {entry!r}")


def to_unit(entry: tuple, value: float) -> float:
    """Inverse of :func:`from_unit` for continuous scales (position of ``value`` in [0, 1])."""
    kind = entry[0]
    if kind == "log":
        return (math.log(value) - math.log(entry[1])) / (math.log(entry[2]) - math.log(entry[1]))
    if kind == "log1m":
        a, b = math.log(1 - entry[1]), math.log(1 - entry[2])
        return (math.log(1 - value) - a) / (b - a)
    if kind == "uniform":
        return (value - entry[1]) / (entry[2] - entry[1])
    raise ValueError(f"to_unit needs a continuous scale, got {entry!r}")


def sample(space: Mapping[str, tuple], n: int, seed: int = 0, method: str = "lhs") -> list[dict]:
    """``n`` configurations from ``space``: Latin hypercube (``lhs``, each dimension stratified
    into ``n`` equal bins, so small budgets still cover every scale) or i.i.d. ``random``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    keys = list(space)
    if method == "lhs":
        u = np.stack([(rng.permutation(n) + rng.random(n)) / n for _ in keys], axis=1)
    elif method == "random":
        u = rng.random((n, len(keys)))
    else:
        raise ValueError(f"unknown sampling method {method!r}; use 'lhs' or 'random'")
    return [{k: from_unit(space[k], float(u[i, j])) for j, k in enumerate(keys)} for i in range(n)]


def grid(entry: tuple, n: int) -> list[float]:
    """``n`` evenly spaced values (on the entry's scale) from ``lo`` to ``hi`` inclusive."""
    if n == 1:
        return [from_unit(entry, 0.5)]
    return [from_unit(entry, i / (n - 1)) for i in range(n)]


def on_edge(entry: tuple, value: float, n_trials: int) -> str | None:
    """``"low"``/``"high"`` when ``value`` lies in the outermost ``min(1/n_trials, 0.1)`` of the
    range, on the entry's scale (the best lr at the edge of its range: Wilson et al. 2017 would
    extend it), else ``None``."""
    u = to_unit(entry, value)
    w = min(1.0 / max(n_trials, 1), 0.1)
    if u <= w:
        return "low"
    if u >= 1 - w:
        return "high"
    return None


def with_schedule(make: Callable[[Any], Any], schedule: str | None,
                  total_steps: int) -> Callable[[Any], Any]:
    """Wrap an optimizer factory so that its learning rate follows ``schedule``.

    ``"constant"`` (or ``None``) returns ``make`` unchanged; ``"cosine"`` anneals every group's
    lr from its initial value to 0 over ``total_steps`` (``torch.optim.lr_scheduler.
    CosineAnnealingLR``, stepped by a step post-hook, so the training loop needs no change).
    """
    if schedule in (None, "constant"):
        return make
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: "
                         f"{', '.join(SCHEDULES)}")

    def factory(params: Any) -> Any:
        import torch

        opt = make(params)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(total_steps), 1))
        opt.register_step_post_hook(lambda *_: sched.step())
        opt.lr_scheduler = sched  # keeps it alive and inspectable
        return opt

    return factory
