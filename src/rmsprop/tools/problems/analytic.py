"""Analytic test functions: classic non-convex 2-D/N-D functions and the DeepOBS noisy quadratic.

Definitions and optima (Jamil & Yang 2013, "A literature survey of benchmark functions for
global optimization problems"):

- Rosenbrock ``(1-x)^2 + 100 (y-x^2)^2``, minimum 0 at (1, 1); N-D sum form
  ``sum_i 100 (x_{i+1}-x_i^2)^2 + (1-x_i)^2``, minimum 0 at (1, ..., 1).
- Beale ``(1.5-x+xy)^2 + (2.25-x+xy^2)^2 + (2.625-x+xy^3)^2``, minimum 0 at (3, 0.5).
- Rastrigin ``10 d + sum_i (x_i^2 - 10 cos(2 pi x_i))``, minimum 0 at 0, a local minimum near
  every integer point.
- Himmelblau ``(x^2+y-11)^2 + (x+y^2-7)^2``, four minima of value 0.
- Bounded saddle ``x^2 - y^2 + y^4/4``: a saddle at 0, minima -1 at (0, +-sqrt 2); started next to
  the saddle it measures escape time.
- DeepOBS ``quadratic_deep``: ``0.5 (theta - x)^T Q (theta - x)``, ``x ~ N(0, I)`` per example,
  ``Q = R^T D R`` with 90 eigenvalues from U(0, 1), 10 from U(30, 60) and a Haar-random rotation,
  all fixed by ``RandomState(42)`` (Schneider et al., ICLR 2019). Its evaluation loss is the
  excess ``0.5 theta^T Q theta`` (the expected loss minus its floor ``0.5 tr Q``), minimum 0 at 0.

Noisy variants follow DeepOBS's toy problems: the training loss gets a random linear term
``theta . z`` with ``z ~ N(0, sigma^2 / B)`` (the batch mean of per-example ``N(0, sigma^2)``
data), so the gradient noise is controlled by the batch size; evaluation uses the noise-free
function. Deterministic variants start at a fixed point plus a seed-dependent jitter, so seeds
differ by start only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import Problem, Task, stream_seed

__all__ = [
    "AnalyticProblem", "NoisyQuadratic", "rosenbrock", "beale", "rastrigin", "himmelblau",
    "saddle", "rosenbrock_nd",
]


def rosenbrock(x):  # noqa: ANN001 - torch or numpy array, last axis = coordinates
    """N-D Rosenbrock (2-D when ``x`` has two coordinates); minimum 0 at ones."""
    a, b = x[..., :-1], x[..., 1:]
    return (100.0 * (b - a**2) ** 2 + (1.0 - a) ** 2).sum(-1)


rosenbrock_nd = rosenbrock


def beale(x):  # noqa: ANN001
    """Beale's function; minimum 0 at (3, 0.5)."""
    u, v = x[..., 0], x[..., 1]
    return (1.5 - u + u * v) ** 2 + (2.25 - u + u * v**2) ** 2 + (2.625 - u + u * v**3) ** 2


def rastrigin(x):  # noqa: ANN001
    """Rastrigin's function; minimum 0 at the origin."""
    import numpy as np

    cos = np.cos(2 * np.pi * x) if isinstance(x, np.ndarray) else (2 * math.pi * x).cos()
    return 10.0 * x.shape[-1] + (x**2 - 10.0 * cos).sum(-1)


def himmelblau(x):  # noqa: ANN001
    """Himmelblau's function; four minima of value 0."""
    u, v = x[..., 0], x[..., 1]
    return (u**2 + v - 11.0) ** 2 + (u + v**2 - 7.0) ** 2


def saddle(x):  # noqa: ANN001
    """Bounded saddle ``x^2 - y^2 + y^4/4``; minima -1 at (0, +-sqrt(2))."""
    u, v = x[..., 0], x[..., 1]
    return u**2 - v**2 + v**4 / 4.0


@dataclass
class AnalyticProblem(Problem):
    """Minimize ``fn`` from ``start`` (+ seed jitter); optional DeepOBS-style gradient noise.

    ``optima`` lists the global minimizers (for tests and plots); ``bounds`` the plotting box.
    """

    fn: Callable = field(default=rosenbrock, repr=False)
    start: Sequence[float] = (0.0, 0.0)
    jitter: Sequence[float] | float = 0.1
    noise_std: float = 0.0
    optima: Sequence[Sequence[float]] = ()
    bounds: Sequence[Sequence[float]] | None = None

    def __post_init__(self) -> None:
        self.kind = "analytic"
        self.dim = len(self.start)

    @property
    def deterministic(self) -> bool:  # noqa: D102
        return self.noise_std == 0

    def value(self, x):  # noqa: ANN001, ANN201
        """The noise-free function (torch or NumPy input)."""
        return self.fn(x)

    def build(self, seed: int) -> Task:
        import torch

        g_init = torch.Generator().manual_seed(stream_seed(seed, "init"))
        g_noise = torch.Generator().manual_seed(stream_seed(seed, "noise"))
        start = torch.tensor(list(self.start), dtype=torch.float64)
        jitter = torch.as_tensor(self.jitter, dtype=torch.float64)
        x0 = start + jitter * torch.randn(start.shape, generator=g_init, dtype=torch.float64)
        p = torch.nn.Parameter(x0)
        batch = self.batch_size or 1
        sigma = self.noise_std / math.sqrt(batch)
        fn = self.fn

        def train_loss() -> torch.Tensor:
            loss = fn(p)
            if sigma > 0:
                z = torch.randn(p.shape, generator=g_noise, dtype=torch.float64) * sigma
                loss = loss + (p * z).sum()
            return loss

        def evaluate(split: str) -> tuple[float, None]:
            with torch.no_grad():
                return float(fn(p)), None

        point = (lambda: p.detach().tolist()) if self.dim == 2 else None
        return Task([p], train_loss, evaluate, point)


@dataclass
class NoisyQuadratic(Problem):
    """DeepOBS ``quadratic_deep`` (see module docstring); ``dim`` = 100 by default."""

    n_large: int = 10
    theta0: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.kind = "analytic"
        self.dim = self.dim or 100

    def hessian(self):  # noqa: ANN201
        """``Q = R^T D R`` as a NumPy array, identical on every call (``RandomState(42)``)."""
        import numpy as np

        if "Q" not in self._cache:
            rs = np.random.RandomState(42)
            d = self.dim
            eig = np.concatenate([rs.uniform(0.0, 1.0, d - self.n_large),
                                  rs.uniform(30.0, 60.0, self.n_large)])
            # Haar rotation: QR of a Gaussian matrix with the sign fix of Mezzadri (2007)
            a = rs.normal(size=(d, d))
            q, r = np.linalg.qr(a)
            q = q * np.sign(np.diag(r))
            self._cache["Q"] = q.T @ np.diag(eig) @ q
            self._cache["eig"] = eig
        return self._cache["Q"]

    def value(self, theta):  # noqa: ANN001, ANN201
        """Excess expected loss ``0.5 theta^T Q theta`` (NumPy)."""
        import numpy as np

        q = self.hessian()
        theta = np.asarray(theta, dtype=float)
        return 0.5 * theta @ q @ theta

    def build(self, seed: int) -> Task:
        import torch

        q = torch.tensor(self.hessian(), dtype=torch.float64)
        g_noise = torch.Generator().manual_seed(stream_seed(seed, "noise"))
        dim = int(self.dim or 0)
        p = torch.nn.Parameter(torch.full((dim,), self.theta0, dtype=torch.float64))
        batch = self.batch_size or 128

        def train_loss() -> torch.Tensor:
            x = torch.randn((batch, dim), generator=g_noise, dtype=torch.float64)
            diff = p - x
            return 0.5 * ((diff @ q) * diff).sum(1).mean()

        def evaluate(split: str) -> tuple[float, None]:
            with torch.no_grad():
                return float(0.5 * p @ q @ p), None

        return Task([p], train_loss, evaluate, None)


def analytic_problems() -> list[Problem]:
    """Every analytic problem, in a stable order."""
    s2 = math.sqrt(2.0)
    hb = [(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)]
    common: dict[str, Any] = dict(steps=1000, eval_every=10, batch_size=None, known_min=0.0)
    return [
        AnalyticProblem("rosenbrock", "2-D Rosenbrock from (-1.5, 2) +- 0.1: curved narrow valley",
                        fn=rosenbrock, start=(-1.5, 2.0), jitter=0.1, optima=[(1.0, 1.0)],
                        bounds=[(-2.0, 2.0), (-1.0, 3.0)], **common),
        AnalyticProblem("rosenbrock-noisy", "2-D Rosenbrock, DeepOBS noise (sigma 1, batch 128)",
                        fn=rosenbrock, start=(-1.5, 2.0), jitter=0.0, noise_std=1.0,
                        optima=[(1.0, 1.0)], bounds=[(-2.0, 2.0), (-1.0, 3.0)],
                        target_tau=1e-2, **{**common, "batch_size": 128}),
        AnalyticProblem("beale", "Beale from (1, 1.5) +- 0.1: flat plateaus, sharp ridges",
                        fn=beale, start=(1.0, 1.5), jitter=0.1, optima=[(3.0, 0.5)],
                        bounds=[(-4.5, 4.5), (-4.5, 4.5)], **common),
        AnalyticProblem("rastrigin", "2-D Rastrigin from (-2.5, 2.2) +- 0.3: a local minimum per "
                        "integer point", fn=rastrigin, start=(-2.5, 2.2), jitter=0.3,
                        optima=[(0.0, 0.0)], bounds=[(-4.0, 4.0), (-4.0, 4.0)], **common),
        AnalyticProblem("himmelblau", "Himmelblau from (0, 0) +- 0.5: four equal minima",
                        fn=himmelblau, start=(0.0, 0.0), jitter=0.5, optima=hb,
                        bounds=[(-5.0, 5.0), (-5.0, 5.0)], **common),
        AnalyticProblem("saddle", "bounded saddle x^2-y^2+y^4/4 from (1, 1e-6): escape time",
                        fn=saddle, start=(1.0, 1e-6), jitter=(0.1, 0.0), optima=[(0.0, s2),
                        (0.0, -s2)], bounds=[(-1.5, 1.5), (-2.0, 2.0)],
                        **{**common, "known_min": -1.0, "steps": 500}),
        NoisyQuadratic("quadratic-100d", "DeepOBS noisy quadratic, 100-D, batch 128", steps=500,
                       eval_every=10, batch_size=128, known_min=0.0, target_tau=1e-2, dim=100,
                       convex=True),
        AnalyticProblem("rosenbrock-20d", "20-D Rosenbrock (sum form) from (-1.2, 1, ...) +- 0.1",
                        fn=rosenbrock, start=tuple([-1.2, 1.0] * 10), jitter=0.1,
                        optima=[tuple([1.0] * 20)], **{**common, "steps": 3000, "eval_every": 30}),
        AnalyticProblem("rastrigin-10d", "10-D Rastrigin from 2.5 +- 0.5 per coordinate",
                        fn=rastrigin, start=tuple([2.5] * 10), jitter=0.5,
                        optima=[tuple([0.0] * 10)], **{**common, "steps": 2000, "eval_every": 20}),
    ]
