"""Load a user's own problem for ``rmsprop compare`` / ``rmsprop tune`` from ``pkg.module:attr``.

``attr`` is a :class:`~rmsprop.tools.problems.base.Problem` (usually a
:class:`~rmsprop.tools.problems.base.ModelProblem`) or a callable taking no argument that
returns one (``make_problem``). The module is imported the way ``python -m`` imports one: the
working directory comes first on ``sys.path``, so ``examples.my_problem:make_problem`` works
from the folder that holds ``examples/``.

Every problem is checked once before anything runs (:func:`check`): one build at seed 0, one
training loss and one evaluation, so that a wrong factory fails with one line naming the problem
and what is wrong, instead of a traceback in the middle of a run.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Any

__all__ = ["ProblemError", "load_problem", "check", "cwd_on_path", "fingerprint", "resolve",
           "register", "source_of"]

#: problems handed over as objects (the Python API), by their key ``"@name"``
_LIVE: dict[str, Any] = {}
#: problems loaded from an import path, by that path (a worker loads each once)
_LOADED: dict[str, Any] = {}


class ProblemError(ValueError):
    """A user problem that cannot be used: the message is one line naming it and the fault."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cwd_on_path() -> None:
    """Put the working directory first on ``sys.path``, as ``python -m`` does: a console script
    has its own folder there instead, so a module beside the user would not import."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path[:1]):
        sys.path.insert(0, cwd)


def load_problem(spec: str) -> Any:
    """The checked problem named by ``"pkg.module:attr"`` (attributes may be dotted).

    Raises :class:`ProblemError` when the module does not import, the attribute is missing, the
    factory raises or returns something else than a ``Problem``, or :func:`check` fails.
    """
    from rmsprop.tools.problems.base import Problem

    if spec in _LOADED:
        return _LOADED[spec]
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name.strip() or not attr.strip():
        raise ProblemError(f"problem {spec!r}: expected an import path 'pkg.module:make_problem'")
    cwd_on_path()
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ProblemError(f"problem {spec!r}: no module named {e.name!r} (run from the "
                               "folder that holds it, or install it)") from None
        raise ProblemError(f"problem {spec!r}: importing {mod_name!r} failed: "
                           f"{_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - any error in the user's module is theirs to see
        raise ProblemError(f"problem {spec!r}: importing {mod_name!r} failed: "
                           f"{_one_line(e)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ProblemError(f"problem {spec!r}: module {mod_name!r} has no attribute "
                               f"{attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Problem):
        if not callable(obj):
            raise ProblemError(f"problem {spec!r}: {attr!r} is a {type(obj).__name__}, neither "
                               "a Problem nor a function returning one")
        try:
            obj = obj()
        except Exception as e:  # noqa: BLE001
            raise ProblemError(f"problem {spec!r}: {attr}() raised {_one_line(e)}") from None
        if not isinstance(obj, Problem):
            raise ProblemError(f"problem {spec!r}: {attr}() returned a {type(obj).__name__}, "
                               "not a rmsprop.tools.problems.Problem (build one with "
                               "ModelProblem(...))")
    check(obj, spec)
    _LOADED[spec] = obj
    return obj


def check(problem: Any, source: str | None = None) -> None:
    """Validate ``problem`` before any run: fields, then one build at seed 0, one training loss
    and one evaluation of the validation split (torch's global RNG is left as it was).

    Raises :class:`ProblemError` naming the problem (and ``source``) and the fault: a model with
    no parameters, a loss that is not a scalar tensor depending on them, an evaluation that does
    not return ``(loss, metric or None)``...
    """
    import torch

    from rmsprop.tools.problems.base import Problem

    where = f"problem {source!r}" if source else "problem"
    if not isinstance(problem, Problem):
        raise ProblemError(f"{where}: a {type(problem).__name__}, not a "
                           "rmsprop.tools.problems.Problem")
    name = problem.name
    if not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name \
            or name.startswith("@") or ":" in name:
        raise ProblemError(f"{where}: name must be a non-empty string without '/', '\\', ':' "
                           f"or a leading '@', got {name!r}")
    where = f"problem {name!r}" + (f" ({source})" if source and source != name else "")
    for field_name in ("steps", "eval_every"):
        v = getattr(problem, field_name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ProblemError(f"{where}: {field_name} must be an integer >= 1, got {v!r}")
    tau = problem.target_tau
    if not (isinstance(tau, (int, float)) and 0 < tau < 1):
        raise ProblemError(f"{where}: target_tau must lie in (0, 1), got {tau!r}")
    missing = problem.missing()
    if missing:
        raise ProblemError(f"{where} needs {', '.join(missing)}: pip install "
                           + " ".join(missing))
    with torch.random.fork_rng(devices=[]):
        try:
            task = problem.build(0)
        except Exception as e:  # noqa: BLE001
            raise ProblemError(f"{where}: build(seed=0) raised {_one_line(e)}") from None
        params = list(task.params)
        if not params:
            raise ProblemError(f"{where}: the model has no parameters to train")
        bad = [i for i, p in enumerate(params)
               if not (isinstance(p, torch.Tensor) and p.requires_grad)]
        if bad:
            raise ProblemError(f"{where}: parameter {bad[0]} is not a tensor with "
                               "requires_grad=True")
        try:
            loss = task.train_loss()
        except Exception as e:  # noqa: BLE001
            raise ProblemError(f"{where}: the training loss raised {_one_line(e)}") from None
        if not isinstance(loss, torch.Tensor):
            raise ProblemError(f"{where}: the loss must be a scalar tensor, got a "
                               f"{type(loss).__name__}")
        if loss.numel() != 1 or loss.dim() > 1:
            raise ProblemError(f"{where}: the loss is not a scalar: shape "
                               f"{tuple(loss.shape)} (reduce it, e.g. with .mean())")
        if not loss.requires_grad:
            raise ProblemError(f"{where}: the loss does not depend on the parameters (it "
                               "has no gradient)")
        if loss.is_complex() or not math.isfinite(float(loss.detach())):
            raise ProblemError(f"{where}: the initial loss is {float(loss.detach().real)}, "
                               "not a finite real number")
        for split in ("valid", "test"):  # a run evaluates both: fail here, not mid-run
            try:
                ev = task.evaluate(split)
            except Exception as e:  # noqa: BLE001
                raise ProblemError(f"{where}: evaluating the {split!r} split raised "
                                   f"{_one_line(e)}") from None
            ok = (isinstance(ev, tuple) and len(ev) == 2 and isinstance(ev[0], (int, float))
                  and (ev[1] is None or isinstance(ev[1], (int, float))))
            if not ok:
                raise ProblemError(f"{where}: evaluate({split!r}) must return (loss, metric or "
                                   f"None) as floats, got {ev!r:.80}")


def fingerprint(key: str, problem: Any = None) -> dict[str, Any] | None:
    """What identifies the user problem of ``key`` (``problem`` when given, else loaded by
    :func:`resolve`) beyond its fields, so that a resumed compare or tune notices an edit: the
    hash of the module file it came from, the model's parameter shapes at seed 0 and, for a
    ``ModelProblem``, the examples in each evaluation split. None for a suite problem, whose
    code is the library's."""
    if not (key.startswith("@") or ":" in key):
        return None
    if problem is None:
        problem = resolve(key)
    import hashlib

    import torch

    from rmsprop.tools.problems.base import ModelProblem, _batch_size

    module = sys.modules.get(key.partition(":")[0]) if ":" in key else None
    path = getattr(module, "__file__", None)
    digest = None
    if path:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
    out: dict[str, Any] = {"source_hash": digest}

    def examples(split: str) -> int | None:
        try:
            return sum(_batch_size(b) for b in problem.eval_batches(split))
        except Exception:  # noqa: BLE001 - a split that fails is the run's to report
            return None

    with torch.random.fork_rng(devices=[]):
        out["parameter_shapes"] = [list(p.shape) for p in problem.build(0).params]
        if isinstance(problem, ModelProblem):
            out["data_sizes"] = {s: examples(s) for s in ("valid", "test")}
    return out


def register(problem: Any) -> str:
    """Hand a ``Problem`` object to the runner (the Python API); returns its key ``"@name"``.

    Worker processes are forked after this, so they see it too."""
    check(problem)
    key = "@" + problem.name
    _LIVE[key] = problem
    return key


def resolve(name: str) -> Any:
    """A problem by key: ``"@name"`` (registered object), ``"pkg.module:attr"`` (import path,
    loaded and checked once) or a suite name (``ValueError`` listing the valid names)."""
    if name.startswith("@"):
        if name not in _LIVE:
            raise ProblemError(f"problem {name[1:]!r} was not registered in this process")
        return _LIVE[name]
    if ":" in name:
        return load_problem(name)
    from rmsprop.tools import problems

    return problems.get(name)


def source_of(key: str) -> str:
    """How the report names where a problem came from."""
    if key.startswith("@"):
        return "a Problem object (Python API)"
    return f"`{key}`" if ":" in key else "the suite"
