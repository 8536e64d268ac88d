"""RMSProp on NumPy arrays: a thin stateful wrapper over :func:`rmsprop.spec.step`.

Example::

    import numpy as np
    from rmsprop.numpy import RMSprop
    w = np.zeros(3)
    opt = RMSprop([w], lr=1e-2)
    opt.step([np.array([1.0, -2.0, 0.5])])   # updates w in place
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import codecs, spec
from .options import RULE_OPTIONS, Options, validate
from .presets import resolve_preset

__all__ = ["RMSprop"]


class RMSprop:
    """RMSProp over a list of NumPy arrays (updated in place), with torch-style param groups.

    ``params`` is a sequence of arrays or of dicts ``{"params": [...], **options}``; options are
    those of :class:`rmsprop.options.Options` (same names and defaults as the torch optimizer).
    Change a group's ``"lr"`` between steps to follow a schedule. ``state_dtype`` sets the
    storage of the state arrays: the param's real dtype (default), a float dtype, or ``"8bit"``
    / ``"4bit"`` quantized state (:mod:`rmsprop.codecs`). ``stochastic_rounding=True`` rounds
    new ``bfloat16``/``float16`` params stochastically, from ``seed`` (param ``k`` in flat order
    uses :func:`rmsprop.codecs.param_seed(seed, k) <rmsprop.codecs.param_seed>`).
    """

    def __init__(self, params: Iterable[Any], *, state_dtype: Any = None,
                 stochastic_rounding: bool = False, seed: int = 0, **options: Any) -> None:
        unknown = set(options) - set(RULE_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        self.defaults = Options(**options).as_dict()
        if state_dtype is not None:
            codecs.init_entry("square_avg", (1,), 0.0, state_dtype, np.float32)  # validates
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"Invalid stochastic_rounding value: {stochastic_rounding!r} "
                             "(expected True or False)")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
            raise ValueError(f"Invalid seed: {seed!r} (an integer in [0, 2**32))")
        self.state_dtype = state_dtype
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if len({isinstance(x, dict) for x in params}) > 1:
            raise TypeError("params must be all arrays or all param-group dicts, not both")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        self.state: list[list[spec.State | None]] = []
        for group in groups:
            self.add_param_group(group)

    @classmethod
    def from_preset(cls, name: str, params: Iterable[Any], **overrides: Any) -> RMSprop:
        """Build with the options of ``rmsprop.PRESETS[name]``, updated by ``overrides``."""
        params = list(params)
        return cls(params, **resolve_preset(name, overrides, params))

    def add_param_group(self, group: dict[str, Any]) -> None:
        group = dict(group)
        if "params" not in group:
            raise ValueError("a param group needs a 'params' list")
        arrays = list(group.pop("params"))
        known = {id(a) for g in getattr(self, "param_groups", []) for a in g["params"]}
        for a in arrays:
            if not isinstance(a, np.ndarray):
                raise TypeError(f"params must be numpy arrays, got {type(a).__name__}")
            if not spec.steppable(a.dtype):
                raise TypeError(f"params must be floating point or complex, got {a.dtype}")
            if not a.flags.writeable:
                raise ValueError("params must be writable arrays (the step updates them in "
                                 "place); got a read-only one")
            if id(a) in known:
                raise ValueError("some parameters appear in more than one parameter group "
                                 "(or twice in one)")
            known.add(id(a))
        unknown = set(group) - set(RULE_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        validate(group)
        self.param_groups.append({**self.defaults, **group, "params": arrays})
        self.state.append([None] * len(arrays))

    def step(self, grads: Sequence[np.ndarray | None]) -> None:
        """Apply one step. ``grads`` lists one gradient per param (``None`` skips that param and
        leaves its state untouched), flat across groups in order. Nothing changes if any
        gradient's shape does not fit."""
        flat = list(grads)
        expected = sum(len(g["params"]) for g in self.param_groups)
        if len(flat) != expected:
            raise ValueError(f"expected {expected} gradients, got {len(flat)}")
        pairs = []
        i = 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = flat[i]
                i += 1
                if g is None:
                    continue
                g = np.asarray(g)
                if g.shape != p.shape:
                    raise ValueError(f"gradient {i - 1} has shape {g.shape}, param has {p.shape}")
                pairs.append((gi, pi, p, g))
        results = []
        offsets = np.cumsum([0] + [len(g["params"]) for g in self.param_groups])
        for gi, pi, p, g in pairs:
            group = self.param_groups[gi]
            options = Options.quiet(**{k: group[k] for k in RULE_OPTIONS})
            state = self.state[gi][pi]
            if state is None:
                seed = (codecs.param_seed(self.seed, int(offsets[gi]) + pi)
                        if self.stochastic_rounding else None)
                state = spec.init_state(p, options, state_dtype=self.state_dtype, seed=seed)
            results.append((gi, pi, p, *spec.step(p, g, state, options)))
        if not all(p.flags.writeable for _, _, p, _, _ in results):
            raise ValueError("a param has become read-only; nothing was changed")
        for gi, pi, p, new_p, new_state in results:  # write only after every step succeeded
            p[...] = new_p
            self.state[gi][pi] = new_state
