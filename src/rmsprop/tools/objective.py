"""What one tuning trial measures: a training run of a problem, scored on validation.

* **Problems**: a suite name (``mlp-digits``) or a user's ``pkg.module:make_problem``, loaded
  and checked by :mod:`rmsprop.tools.user_problem` (the same protocol as ``rmsprop compare``).
* **Optimizers**: a registry name (``rmsprop``, ``adam``...), a ``pkg.module:Class`` optimizer,
  or a ``pkg.module:attr`` object with ``factory`` and ``search_space`` (an ``OptimizerSpec``).
* **Objective**: the final validation loss (default), or the number of steps until the
  validation loss first reaches ``target`` (censored at ``budget + eval interval`` when never
  reached). A diverged run scores the finite :data:`~rmsprop.tools.study.PENALTY` and is
  flagged, so it is counted in every statistic and never dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

from rmsprop.tools.study import PENALTY, TuneError

__all__ = ["Evaluation", "evaluate", "make_factory", "resolve_optimizer", "resolve_problem"]


def resolve_problem(name: str) -> Any:
    """A problem by suite name (``mlp-digits``) or by ``pkg.module:attr`` (a user's problem,
    loaded and checked once); :class:`TuneError` naming the valid names otherwise."""
    from rmsprop.tools import problems, user_problem

    try:
        return user_problem.resolve(name)
    except user_problem.ProblemError as e:
        raise TuneError(str(e)) from None
    except (KeyError, ValueError, LookupError):
        known = problems.names()
        head, dash, tail = name.partition("-")
        hint = ""
        if dash and f"{tail}-{head}" in known:  # dataset-model order, as "digits-mlp"
            hint = f" (did you mean {tail}-{head}?)"
        raise TuneError(f"unknown problem {name!r}{hint}; known: {', '.join(known)}, "
                        "or pkg.module:make_problem") from None


def resolve_optimizer(name: str) -> Any:
    """An ``OptimizerSpec`` by registry name (``rmsprop``, ``adam``...) or ``module:attr``."""
    from rmsprop.tools.problems import optimizers
    from rmsprop.tools.user_problem import cwd_on_path

    if not isinstance(name, str):
        raise TuneError(f"optimizer must be a name (rmsprop, adam...) or 'pkg.module:Class', got "
                        f"{name!r:.60}")
    if ":" in name:
        import importlib

        mod, _, attr = name.partition(":")
        cwd_on_path()
        try:
            obj: Any = importlib.import_module(mod)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise TuneError(f"cannot import optimizer {name!r}: {e}") from None
        if hasattr(obj, "factory") and hasattr(obj, "search_space"):
            return obj  # an OptimizerSpec-like object
    try:
        return optimizers.resolve(name)
    except (KeyError, ValueError, LookupError, ImportError) as e:
        if ":" in name:
            raise TuneError(str(e)) from None
        known = ", ".join(optimizers.OPTIMIZERS)
        raise TuneError(f"unknown optimizer {name!r}; known: {known}, or pkg.module:Class") \
            from None


def make_factory(spec: Any, hp: dict[str, float]) -> Callable[[Any], Any]:
    """``params -> optimizer`` with the spec's defaults overridden by ``hp``."""
    if hasattr(spec, "make"):
        return functools.partial(spec.make, **hp)
    return functools.partial(spec.factory, **hp)


@dataclasses.dataclass
class Evaluation:
    """One training run scored for the search: ``value`` is what the sampler minimizes."""

    value: float
    diverged: bool
    final_eval_loss: float
    attrs: dict[str, Any]


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` when it is a finite number, else None (JSON and CSV friendly)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def score(res: Any, *, objective: str = "loss", target: float | None = None) -> Evaluation:
    """Score a finished run (a ``RunResult``): final validation loss, or steps to ``target``
    (first evaluation step with loss ``<= target``; never reached -> last step + one eval
    interval, ``reached=False``). A diverged or non-finite run scores ``PENALTY``."""
    loss = float(res.final_eval_loss)
    diverged = bool(getattr(res, "diverged", False)) or not math.isfinite(loss)
    losses = list(getattr(res, "eval_loss", []) or [])
    attrs: dict[str, Any] = {
        "diverged": diverged,
        "final_eval_loss": loss if math.isfinite(loss) else None,
        "initial_eval_loss": finite_or_none(losses[0]) if losses else None,
        "seconds_per_step": finite_or_none(getattr(res, "seconds_per_step", None)),
    }
    metric = finite_or_none(getattr(res, "final_eval_metric", None))
    if metric is not None:
        attrs["final_eval_metric"] = metric
    if objective == "steps":
        if target is None:
            raise TuneError("--objective steps needs --target (a validation loss to reach)")
        steps_seen = list(getattr(res, "eval_steps", []) or [])
        hit = next((s for s, v in zip(steps_seen, losses)
                    if math.isfinite(float(v)) and float(v) <= target), None)
        interval = steps_seen[-1] - steps_seen[-2] if len(steps_seen) > 1 else 1
        value = float(hit) if hit is not None else float((steps_seen[-1] if steps_seen else 0)
                                                          + interval)
        attrs["reached"] = hit is not None
        attrs["steps_to_target"] = hit
    else:
        value = loss
    if diverged:
        value = PENALTY
    return Evaluation(value=value, diverged=diverged, final_eval_loss=loss, attrs=attrs)


def evaluate(problem: Any, spec: Any, hp: dict[str, float], *, seed: int, objective: str = "loss",
             target: float | None = None, steps: int | None = None) -> Evaluation:
    """Train ``problem`` with ``spec`` at ``hp`` on seed ``seed`` and :func:`score` it on the
    validation split."""
    res = problem.run(make_factory(spec, hp), seed=seed, steps=steps, split="valid")
    return score(res, objective=objective, target=target)
