"""The problem/run contract shared by ``rmsprop compare`` and ``rmsprop tune``.

A :class:`Problem` fixes model, loss, batch size, step budget, evaluation interval and data split;
:meth:`Problem.run` trains it with any ``torch.optim.Optimizer`` and returns a :class:`RunResult`.

Seeds follow *common random numbers*: for a given problem, ``seed=k`` gives every optimizer the
same initial parameters, the same minibatch order and the same gradient noise, so differences
between optimizers at one seed are paired. Each randomness source has its own stream derived from
``(seed, stream name)``; the train/validation/test split has a fixed seed of its own, independent of
``seed`` (as in DeepOBS and AlgoPerf).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:  # torch is imported lazily so that listing problems stays cheap
    import torch

__all__ = ["Problem", "RunResult", "Task", "stream_seed", "DIVERGENCE_FACTOR"]

#: A run diverges when its loss is non-finite, or its excess over the reference (``known_min``,
#: else 0) exceeds this multiple of the initial excess (DeepOBS/benchmarks.md section 9.3).
DIVERGENCE_FACTOR = 10.0

OptimizerFactory = Callable[[list["torch.nn.Parameter"]], "torch.optim.Optimizer"]


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named randomness stream of run ``seed``.

    Hash-derived (not ``seed + offset``) so that streams of neighbouring seeds never coincide, and
    stable across processes (Python's ``hash`` is salted per process).
    """
    digest = hashlib.blake2b(f"{int(seed)}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class RunResult:
    """One training run: curves, final numbers, divergence and per-step time.

    ``train_loss[i]`` is the minibatch loss at ``steps[i]`` (before that step's update);
    ``eval_loss`` / ``eval_metric`` are on the split passed to :meth:`Problem.run` at
    ``eval_steps`` (step 0 is the initial point). ``test_*`` are measured once, at the end, on the
    test split (``None`` for analytic functions, which have no held-out data).
    ``seconds_per_step`` is the median wall time of one forward/backward/update, evaluation and
    the first steps (warm-up) excluded, as in AlgoPerf.
    """

    steps: list[int]
    train_loss: list[float]
    eval_steps: list[int]
    eval_loss: list[float]
    eval_metric: list[float] | None
    final_eval_loss: float
    final_eval_metric: float | None
    test_loss: float | None
    test_metric: float | None
    diverged: bool
    seconds_per_step: float
    #: parameter values at each of ``eval_steps`` (2-D analytic problems only; for plots)
    trajectory: list[list[float]] | None = None
    split: str = "valid"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: non-finite floats become ``None`` (strict JSON has no NaN/Infinity)."""
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        """Inverse of :meth:`to_dict`; ``None`` inside loss curves reads back as ``nan``."""
        d = dict(d)
        for key in ("train_loss", "eval_loss", "eval_metric"):
            if d.get(key) is not None:
                d[key] = [math.nan if v is None else float(v) for v in d[key]]
        for key in ("final_eval_loss",):
            if d.get(key) is None:
                d[key] = math.inf
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass
class Task:
    """What a problem builds for one seed; :meth:`Problem.run` drives it.

    ``train_loss()`` returns the loss of the next minibatch (a scalar tensor with grad);
    ``evaluate(split)`` returns ``(loss, metric or None)`` on a whole split, without grad.
    """

    params: list["torch.nn.Parameter"]
    train_loss: Callable[[], "torch.Tensor"]
    evaluate: Callable[[str], tuple[float, float | None]]
    point: Callable[[], list[float]] | None = None


@dataclass
class Problem:
    """A benchmark problem with a fixed model, loss, batch size, budget and split.

    Subclasses implement :meth:`build`. ``known_min`` is the global minimum of the evaluation loss
    where it is known in closed form (analytic functions); ``target_tau`` is the Moré–Wild
    tolerance for steps-to-target, ``l_L + tau * (l_0 - l_L)``; ``metric_name`` names
    ``eval_metric`` (higher is better), ``None`` when there is only a loss.
    """

    name: str
    description: str
    steps: int
    eval_every: int
    batch_size: int | None
    known_min: float | None = None
    metric_name: str | None = None
    target_tau: float = 1e-3
    kind: str = "analytic"
    dim: int | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    #: importable modules the problem needs beyond torch (checked by :meth:`missing`)
    requires: tuple[str, ...] = field(default_factory=tuple)

    def missing(self) -> list[str]:
        """The modules of :attr:`requires` that cannot be imported here (found without
        importing them)."""
        import importlib.util

        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    @property
    def deterministic(self) -> bool:
        """True when the training loss has no noise (every step sees the exact function), so
        per-step training losses can be read as the objective (oscillation analysis)."""
        return False

    # -- to override -----------------------------------------------------------------------------
    def build(self, seed: int) -> Task:  # pragma: no cover - abstract
        """Create parameters, data streams and closures for run ``seed``."""
        raise NotImplementedError

    # -- shared driver ---------------------------------------------------------------------------
    def run(
        self,
        optimizer_factory: OptimizerFactory,
        *,
        seed: int,
        steps: int | None = None,
        split: str = "valid",
    ) -> RunResult:
        """Train for ``steps`` (default :attr:`steps`) updates and evaluate every ``eval_every``.

        The run stops early, with ``diverged=True``, when a training loss is non-finite or an
        evaluation loss is non-finite or exceeds the reference by more than
        ``DIVERGENCE_FACTOR`` times its initial excess (reference: ``known_min``, else 0).
        """
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        n_steps = self.steps if steps is None else int(steps)
        if n_steps < 0:
            raise ValueError(f"steps must be >= 0, got {n_steps}")
        task = self.build(int(seed))
        opt = optimizer_factory(task.params)
        ref = self.known_min if self.known_min is not None else 0.0

        steps_list: list[int] = []
        train: list[float] = []
        eval_steps: list[int] = []
        eval_loss: list[float] = []
        eval_metric: list[float] | None = [] if self.metric_name else None
        traj: list[list[float]] | None = [] if task.point is not None else None
        times: list[float] = []
        diverged = False

        def do_eval(t: int) -> bool:
            loss, metric = task.evaluate(split)
            eval_steps.append(t)
            eval_loss.append(loss)
            if eval_metric is not None:
                eval_metric.append(math.nan if metric is None else metric)
            if traj is not None:
                traj.append(task.point())
            if not math.isfinite(loss):
                return True
            return (loss - ref) > DIVERGENCE_FACTOR * max(eval_loss[0] - ref, 0.0) and t > 0

        diverged = do_eval(0)
        t = 0
        while t < n_steps and not diverged:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.train_loss()
            loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value):
                steps_list.append(t)
                train.append(value)
                diverged = True
                break
            opt.step()
            times.append(time.perf_counter() - t0)
            steps_list.append(t)
            train.append(value)
            t += 1
            if t % self.eval_every == 0 or t == n_steps:
                diverged = do_eval(t)
        if diverged and (not eval_steps or eval_steps[-1] != t):
            # the point where it blew up, so curves end there rather than at the last good eval
            do_eval(t)

        test_loss = test_metric = None
        if self.kind != "analytic":
            if split == "test":
                test_loss = eval_loss[-1]
                test_metric = eval_metric[-1] if eval_metric else None
            else:
                test_loss, test_metric = task.evaluate("test")
        warm = times[min(5, len(times) // 2):] if times else []
        sps = float(sorted(warm)[len(warm) // 2]) if warm else math.nan
        return RunResult(
            steps=steps_list,
            train_loss=train,
            eval_steps=eval_steps,
            eval_loss=eval_loss,
            eval_metric=eval_metric,
            final_eval_loss=eval_loss[-1] if math.isfinite(eval_loss[-1]) else math.inf,
            final_eval_metric=(eval_metric[-1] if eval_metric else None),
            test_loss=test_loss,
            test_metric=test_metric,
            diverged=diverged,
            seconds_per_step=sps,
            trajectory=traj,
            split=split,
        )


def epoch_batches(n: int, batch_size: int,
                  generator: "torch.Generator") -> Iterator["torch.Tensor"]:
    """Endless minibatch index tensors: a fresh permutation each epoch, the last partial batch
    dropped so every step sees ``batch_size`` examples."""
    import torch

    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def split_indices(n: int, fractions: Sequence[float], seed: int,
                  stratify: Sequence[int] | None = None) -> list[list[int]]:
    """Deterministic train/valid/test index split (NumPy, fixed seed), stratified when labels are
    given so that every split keeps the class balance."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if stratify is None:
        groups = [np.arange(n)]
    else:
        y = np.asarray(stratify)
        groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    out: list[list[int]] = [[] for _ in fractions]
    for g in groups:
        g = rng.permutation(g)
        cuts = np.round(np.cumsum(fractions)[:-1] * len(g)).astype(int)
        for i, part in enumerate(np.split(g, cuts)):
            out[i].extend(part.tolist())
    return [sorted(rng.permutation(o).tolist()) for o in out]
