"""Your own problem for ``rmsprop compare`` (and ``rmsprop tune``): a small MLP on two spirals.

From the folder that holds ``examples/`` (the repository root):

    rmsprop compare --problem examples.my_problem:make_problem
    rmsprop compare --problem examples.my_problem:make_problem --trials 4 --out cmp-spirals
    python examples/my_problem.py          # the same comparison from Python

``make_problem()`` returns a ``ModelProblem``; the callables it is given are the whole protocol:
a model builder, a loss, training batches drawn from a generator the runner seeds (so seed k
gives every optimizer the same initial weights and the same data order), evaluation batches per
split, and optionally a metric. Replace them with your own model and data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rmsprop.tools.problems.base import ModelProblem

Batch = tuple[torch.Tensor, torch.Tensor]


@functools.cache
def spirals(split: str) -> Batch:
    """Two interleaved spirals (1.5 turns each) with Gaussian noise: 600 training, 200
    validation and 200 test points, each split from a fixed seed of its own."""
    n, seed = {"train": (600, 0), "valid": (200, 1), "test": (200, 2)}[split]
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.0, 1.0, n)) * 3.0 * math.pi
    label = rng.integers(0, 2, n)
    angle = t + math.pi * label
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) / (3.0 * math.pi)
    x += rng.normal(0.0, 0.02, x.shape)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(label, dtype=torch.int64)


def make_model() -> nn.Module:
    """A 2-32-32-2 tanh MLP (the runner seeds torch before calling this)."""
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 2))


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of one batch: a scalar tensor."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def accuracy(model: nn.Module, batch: Batch) -> float:
    """Share of correctly classified points (higher is better)."""
    x, y = batch
    return float((model(x).argmax(1) == y).float().mean())


def train_batches(generator: torch.Generator, batch_size: int = 32) -> Iterator[Batch]:
    """Endless minibatches: a fresh permutation of the training set each epoch, drawn from
    ``generator`` (the runner seeds it per seed)."""
    x, y = spirals("train")
    while True:
        perm = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]


def eval_batches(split: str) -> list[Batch]:
    """The whole split as one batch (``"valid"`` or ``"test"``)."""
    return [spirals(split)]


def make_problem() -> ModelProblem:
    """The problem ``rmsprop compare --problem examples.my_problem:make_problem`` runs."""
    return ModelProblem(
        name="spirals-mlp", description="MLP 2-32-32-2 (tanh) on two noisy spirals",
        steps=400, eval_every=5, batch_size=32, target_tau=0.1,
        model=make_model, loss=loss, train_batches=train_batches, eval_batches=eval_batches,
        metric=accuracy, metric_name="accuracy",
    )


if __name__ == "__main__":
    from rmsprop.tools import compare

    res = compare.run(problems=[make_problem()], trials=4, seeds=3)
    print(res.table)
    print(res.verdicts)
    print("report:", res.report_path)
