"""The RMSProp option set: names, defaults and validation, shared by every backend.

Every backend (NumPy, PyTorch, optax) takes the same hyperparameters under the same names and
validates them here, so an option has one meaning and one error message everywhere. Messages use
``torch.optim``'s wording where torch has one for the same mistake.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["Options", "validate", "RULE_OPTIONS", "OptionTypeError"]


class OptionTypeError(TypeError, ValueError):
    """A hyperparameter that is not a number (``lr="0.01"``). A ``TypeError`` as in
    ``torch.optim``; also a ``ValueError``, so code that catches invalid options as
    ``ValueError`` (every other invalid value) catches this one too."""


@dataclass(frozen=True)
class Options:
    """Hyperparameters of the RMSProp rule (see :func:`rmsprop.spec.step` for the formula).

    Defaults are ``torch.optim.RMSprop``'s; the extra options default to torch's behaviour.

    Attributes:
        lr: learning rate (step size), ``>= 0``.
        alpha: decay of the squared-gradient average ``v`` (``rho`` in Keras, ``decay`` in TF1
            and optax), in ``[0, 1]``.
        eps: the term that keeps the denominator away from zero, ``>= 0``.
        weight_decay: L2 penalty (coupled) or decoupled decay factor, ``>= 0``.
        momentum: heavy-ball momentum in ``[0, 1)``; 0 disables the buffer.
        centered: Graves 2013: divide by an estimate of the gradient's standard deviation,
            ``sqrt(max(v - m^2, 0))``, instead of its RMS.
        maximize: ascend the objective instead of descending it.
        eps_in_sqrt: ``sqrt(v + eps)`` (TF, Keras, optax, timm) instead of ``sqrt(v) + eps``.
        initial_square_avg: the value ``v`` starts from: 0 (PyTorch, Keras 3, optax) or 1 (TF1,
            timm's RMSpropTF).
        lr_in_momentum: the momentum buffer accumulates ``lr * g / d`` (TF, Keras, optax, timm)
            instead of ``g / d`` with ``lr`` applied after (PyTorch).
        nesterov: Nesterov momentum as in optax's ``trace(nesterov=True)``; needs momentum > 0.
        bias_correction: divide ``v`` (and ``m``) by ``1 - alpha^t`` as optax does.
        decoupled_weight_decay: ``p *= 1 - lr * weight_decay`` before the step (AdamW-style;
            Keras 3, timm's ``decoupled_decay``) instead of adding ``weight_decay * p`` to the
            gradient (PyTorch).
    """

    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False
    eps_in_sqrt: bool = False
    initial_square_avg: float = 0.0
    lr_in_momentum: bool = False
    nesterov: bool = False
    bias_correction: bool = False
    decoupled_weight_decay: bool = False

    def __post_init__(self) -> None:
        validate(asdict(self))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def quiet(cls, **hp: Any) -> Options:
        """Validate like the constructor but without the ``eps == 0`` warning: for the
        per-step rebuild of options the user already saw warned about at construction."""
        validate(hp, warn=False)
        obj = object.__new__(cls)
        for f in fields(cls):
            object.__setattr__(obj, f.name, hp.get(f.name, f.default))
        return obj


RULE_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(Options))
_FLAGS = ("centered", "maximize", "eps_in_sqrt", "lr_in_momentum", "nesterov", "bias_correction",
          "decoupled_weight_decay")


def _number(name: str, value: Any) -> float:
    """``value`` as a float: a real number, or a 1-element tensor (``lr``); anything else
    raises :class:`OptionTypeError` naming the option."""
    if hasattr(value, "numel") and hasattr(value, "detach"):  # a torch Tensor lr
        if value.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        value = value.detach().reshape(()).item()  # a complex one fails the check below
    if not isinstance(value, numbers.Real):
        raise OptionTypeError(f"Invalid {name} value: {value!r} (expected a real number, got "
                              f"{type(value).__name__})")
    return float(value)


#: Options whose value must be finite: an infinite one makes every step inf or NaN.
_FINITE = ("lr", "eps", "weight_decay", "initial_square_avg")


def validate(hp: Mapping[str, Any], *, warn: bool = True) -> None:
    """Raise ``ValueError`` naming the first invalid option in ``hp`` (NaN and infinity are
    always invalid; a value that is not a number raises :class:`OptionTypeError`, a
    ``TypeError`` as in ``torch.optim``).

    Only keys present in ``hp`` are checked, so a backend can validate a partial param group.
    ``eps == 0`` is accepted with a ``RuntimeWarning`` (unless ``warn=False``: backends warn at
    construction, not at every step): with a zero gradient and a zero square average the step
    is ``0/0 = NaN``. So is ``centered`` with ``bias_correction`` from a zero square average:
    the first step divides by ``eps`` alone.
    """
    checks = {
        "lr": (lambda x: x >= 0, "Invalid learning rate: {}"),
        "alpha": (lambda x: 0 <= x <= 1, "Invalid alpha value: {} (must be in [0, 1])"),
        "eps": (lambda x: x >= 0, "Invalid epsilon value: {}"),
        "weight_decay": (lambda x: x >= 0, "Invalid weight_decay value: {}"),
        "momentum": (lambda x: 0 <= x < 1, "Invalid momentum value: {} (must be in [0, 1))"),
        "initial_square_avg": (lambda x: 0 <= x < math.inf,
                               "Invalid initial_square_avg value: {} (must be finite and >= 0)"),
    }
    for name, (ok, message) in checks.items():
        if name not in hp:
            continue
        x = _number(name, hp[name])
        if math.isnan(x) or not ok(x):
            raise ValueError(message.format(hp[name]))
        if name in _FINITE and math.isinf(x):
            raise ValueError(message.format(hp[name]) + " (must be finite)")
    for name in _FLAGS:
        if name in hp and not isinstance(hp[name], bool):
            raise ValueError(f"Invalid {name} value: {hp[name]!r} (expected True or False)")
    if hp.get("nesterov") and _number("momentum", hp.get("momentum", 0.0)) <= 0:
        raise ValueError("Nesterov momentum requires a momentum > 0")
    if hp.get("bias_correction") and _number("alpha", hp.get("alpha", 0.99)) >= 1:
        raise ValueError("bias_correction requires alpha < 1 (1 - alpha^t would be 0)")
    if (warn and hp.get("centered") and hp.get("bias_correction")
            and _number("initial_square_avg", hp.get("initial_square_avg", 0.0)) == 0):
        warnings.warn("centered=True with bias_correction=True: after one gradient the "
                      "bias-corrected variance v/c - (m/c)^2 is 0, so the first step is "
                      "lr*g/eps (optax's centered rmsprop does the same); use "
                      "initial_square_avg > 0, eps_in_sqrt with a larger eps, or only one "
                      "of the two options",
                      RuntimeWarning, stacklevel=3)
    if warn and "eps" in hp and _number("eps", hp["eps"]) == 0:
        warnings.warn("eps=0: a parameter whose gradient and square average are both zero gets "
                      "a 0/0 = NaN step; use eps > 0 unless every gradient is nonzero",
                      RuntimeWarning, stacklevel=3)
