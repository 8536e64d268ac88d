"""Offline benchmark problems shared by ``rmsprop compare`` and ``rmsprop tune``.

>>> from rmsprop.tools import problems
>>> p = problems.get("rosenbrock")
>>> r = p.run(lambda params: torch.optim.Adam(params, lr=1e-2), seed=1)   # doctest: +SKIP
>>> r.final_eval_loss, r.diverged                                         # doctest: +SKIP

Suites: ``quick`` (the default of ``rmsprop compare``: a few minutes on 2 cores), ``standard``
(the 2-D functions, the noisy quadratic, every data problem, A2C on CartPole and the character
language model; tens of minutes) and ``extended`` (adds the N-D functions; hours). Each
:class:`Problem` fixes model, loss, batch size, step budget, evaluation interval and split;
``seed=k`` gives every optimizer the same initial point, data order and noise (common random
numbers).
"""

from __future__ import annotations

from .analytic import AnalyticProblem, NoisyQuadratic, analytic_problems
from .base import DIVERGENCE_FACTOR, Problem, RunResult, Task, stream_seed
from .data import AddingProblem, DataProblem, data_problems
from .lm import CharLM, lm_problems
from .rl import A2CCartPole, rl_problems

__all__ = [
    "Problem", "RunResult", "Task", "SUITES", "PROBLEMS", "get", "names", "stream_seed",
    "AnalyticProblem", "NoisyQuadratic", "DataProblem", "AddingProblem", "A2CCartPole",
    "CharLM", "DIVERGENCE_FACTOR",
]

#: every problem by name, in a stable order (analytic first)
PROBLEMS: dict[str, Problem] = {
    p.name: p for p in analytic_problems() + data_problems() + rl_problems() + lm_problems()}

SUITES: dict[str, list[str]] = {
    "quick": ["rosenbrock", "saddle", "quadratic-100d", "mlp-digits", "charlm-stdlib-small"],
    "standard": [
        "rosenbrock", "rosenbrock-noisy", "beale", "rastrigin", "himmelblau", "saddle",
        "quadratic-100d", "logreg-cancer", "mlp-digits", "cnn-digits", "mlp-diabetes",
        "mlp-mnist1d", "lstm-adding", "a2c-cartpole", "charlm-stdlib",
    ],
    # everything but the quick suite's smaller language model, which the full one subsumes
    "extended": [n for n in PROBLEMS if n != "charlm-stdlib-small"],
}


def names(suite: str | None = None) -> list[str]:
    """Problem names of ``suite`` (every problem when ``None``)."""
    if suite is None:
        return list(PROBLEMS)
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")
    return list(SUITES[suite])


def get(name: str) -> Problem:
    """The problem called ``name``; ``ValueError`` listing the valid names if there is none."""
    try:
        return PROBLEMS[name]
    except KeyError:
        valid = ", ".join(PROBLEMS)
        raise ValueError(f"unknown problem {name!r}; valid problems: {valid}, or your own "
                         "as pkg.module:make_problem") from None
