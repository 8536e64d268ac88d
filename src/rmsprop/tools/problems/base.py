"""The problem/run contract shared by ``rmsprop compare`` and ``rmsprop tune``.

A :class:`Problem` fixes model, loss, batch size, step budget, evaluation interval and data split;
:meth:`Problem.run` trains it with any ``torch.optim.Optimizer`` and returns a :class:`RunResult`.
A subclass implements one method, :meth:`Problem.build` (seed -> :class:`Task`: the parameters,
a closure giving the next minibatch loss, and an evaluation of a split). :class:`ModelProblem`
is the ready-made subclass for a user's own ``torch.nn.Module`` and data: the protocol behind
``rmsprop compare --problem mypkg.module:make_problem``.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily so that listing problems stays cheap
    import torch

__all__ = ["Problem", "ModelProblem", "RunResult", "Task", "stream_seed", "DIVERGENCE_FACTOR"]

#: A run diverges when its loss is non-finite, or its excess over the reference (``known_min``,
#: else 0) exceeds this multiple of the initial excess (the DeepOBS convention).
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
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
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

    params: list[torch.nn.Parameter]
    train_loss: Callable[[], torch.Tensor]
    evaluate: Callable[[str], tuple[float, float | None]]
    point: Callable[[], list[float]] | None = None


@dataclass
class Problem:
    """A benchmark problem with a fixed model, loss, batch size, budget and split.

    Subclasses implement :meth:`build`. ``known_min`` is the global minimum of the evaluation loss
    where it is known in closed form (analytic functions); ``target_tau`` is the Moré–Wild
    tolerance for steps-to-target, ``l_L + tau * (l_0 - l_L)``; ``metric_name`` names
    ``eval_metric`` (higher is better), ``None`` when there is only a loss; ``convex`` marks a
    convex objective (the report's verdict on non-convex problems leaves those out);
    ``target_loss``, when set, is an absolute target for steps-to-target that replaces the
    relative one (e.g. a return threshold in RL).
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
    convex: bool = False
    target_loss: float | None = None

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

    @property
    def judged_on_eval(self) -> bool:
        """Whether divergence is judged on the evaluation loss (True for analytic functions,
        whose evaluation is the noise-free objective, and for RL, whose evaluation is the
        return) rather than on the training loss (data problems: a held-out loss can grow
        while the model improves). Override where neither fits."""
        return self.kind in ("analytic", "rl")

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

        A run *diverges* when a training or evaluation loss becomes non-finite (the run stops
        there), or when it ends with the objective's excess over the reference (``known_min``,
        else 0) above ``DIVERGENCE_FACTOR`` times its initial excess. The objective is the
        evaluation loss where :attr:`judged_on_eval` (analytic functions, RL) and otherwise the
        mean training loss of the last ``max(eval_every, 10)`` steps: a held-out loss can
        end tenfold above its start while the model still improves (an over-confident
        classifier at 90 % accuracy pays a huge cross-entropy for its few mistakes), which is
        over-fitting, not divergence; and a transient spike that training recovers from is
        not divergence either.
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
            if traj is not None and task.point is not None:
                traj.append(task.point())
            return not math.isfinite(loss)

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
        if not diverged and t > 0:
            limit = DIVERGENCE_FACTOR * max(eval_loss[0] - ref, 0.0)
            recent = train[-max(self.eval_every, 10):]
            end = eval_loss[-1] if self.judged_on_eval else sum(recent) / len(recent)
            diverged = (end - ref) > limit

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


def _batch_size(batch: Any) -> int:
    """Examples in ``batch``: the length of its first tensor (a tensor, or one inside a tuple,
    list or dict); 1 when it holds none (then batches are weighted equally)."""
    items = batch.values() if isinstance(batch, dict) else (
        batch if isinstance(batch, (tuple, list)) else (batch,))
    for x in items:
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
    return 1


@dataclass(kw_only=True)
class ModelProblem(Problem):
    """A user's own ``torch.nn.Module`` and data, trained by the same driver as the suite.

    ``ModelProblem(name, steps, model=..., loss=..., train_batches=..., eval_batches=...)``; the
    four callables are the protocol:

    - ``model()`` returns a fresh ``torch.nn.Module``. It is called with torch's global RNG seeded
      from the run seed's ``init`` stream (and restored after), so seed ``k`` gives every
      optimizer the same initial weights;
    - ``train_batches(generator)`` returns an iterator of training batches (anything ``loss``
      accepts) that does not run out within ``steps``. ``generator`` is a ``torch.Generator``
      seeded from the seed's ``order`` stream: draw the minibatch order from it so that seed
      ``k`` gives every optimizer the same data (common random numbers). Dropout and other
      noise inside the model draw from the seed's ``noise`` stream;
    - ``loss(model, batch)`` returns the minibatch loss to minimize, a scalar tensor;
    - ``eval_batches(split)`` returns an iterable of batches of ``"valid"`` (tuning and the
      report) or ``"test"`` (reported once, at the end). The evaluation loss is the mean of
      ``loss`` over them weighted by batch size (the length of a batch's first tensor), in
      ``model.eval()`` mode without gradients;
    - ``metric(model, batch)`` (optional) returns a float where higher is better (e.g.
      accuracy), averaged like the loss and named ``metric_name``.

    ``steps`` is the budget, ``eval_every`` the evaluation interval (also the resolution of
    steps-to-target), ``target_tau`` the Moré–Wild tolerance of the target (0.1 by default, as
    for the suite's data problems: within 10 % of the gap between the initial loss and the best
    loss any run reached).
    """

    description: str = ""
    eval_every: int = 10
    batch_size: int | None = None
    target_tau: float = 0.1
    model: Callable[[], Any] = field(repr=False)
    loss: Callable[[Any, Any], Any] = field(repr=False)
    train_batches: Callable[[Any], Iterable[Any]] = field(repr=False)
    eval_batches: Callable[[str], Iterable[Any]] = field(repr=False)
    metric: Callable[[Any, Any], float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.kind = "data"
        if self.metric is not None and self.metric_name is None:
            self.metric_name = "metric"
        if self.metric is None:
            self.metric_name = None

    def build(self, seed: int) -> Task:
        """The model under the ``init`` stream, batches from the ``order`` stream."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, "init"))
            net = self.model()
            # the model's own randomness (dropout) gets a stream of its own, kept across steps
            torch.manual_seed(stream_seed(seed, "noise"))
            noise = [torch.get_rng_state()]
        order = torch.Generator().manual_seed(stream_seed(seed, "order"))
        batches = iter(self.train_batches(order))
        name, loss_fn, metric_fn = self.name, self.loss, self.metric

        def train_loss() -> torch.Tensor:
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(f"problem {name!r}: train_batches ran out of batches; it must "
                                 "yield at least `steps` batches (loop over epochs)") from None
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(noise[0])
                out = loss_fn(net, batch)
                noise[0] = torch.get_rng_state()
            return out

        def evaluate(split: str) -> tuple[float, float | None]:
            total = weight = metric_total = 0.0
            was_training = net.training
            net.eval()
            try:
                with torch.no_grad():
                    for batch in self.eval_batches(split):
                        n = _batch_size(batch)
                        total += n * float(loss_fn(net, batch))
                        if metric_fn is not None:
                            metric_total += n * float(metric_fn(net, batch))
                        weight += n
            finally:
                net.train(was_training)
            if weight == 0:
                raise ValueError(f"problem {name!r}: eval_batches({split!r}) gave no batches")
            return total / weight, (metric_total / weight if metric_fn is not None else None)

        return Task([p for p in net.parameters() if p.requires_grad], train_loss, evaluate)


def epoch_batches(n: int, batch_size: int,
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
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
