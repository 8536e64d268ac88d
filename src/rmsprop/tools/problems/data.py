"""Small real-data problems that run offline: scikit-learn's bundled sets, MNIST-1D, adding task.

Data sources (nothing is downloaded at run time):

- ``load_breast_cancer`` (569 x 30, 2 classes), ``load_digits`` (1797 8x8 images, 10 classes) and
  ``load_diabetes`` (442 x 10, regression) ship inside scikit-learn's wheel.
- MNIST-1D (Greydanus & Kobak 2020, arXiv 2011.14439) is *generated* locally by the ``mnist1d``
  package's ``make_dataset`` (deterministic, seed 42; 4000 train + 1000 test); its download path is
  never used.
- The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015): sequences of ``(value,
  marker)`` pairs with values ~ U(0, 1) and exactly two markers; the target is the sum of the two
  marked values. Predicting the mean (1.0) gives MSE ~ 1/6, the bar a recurrent model must beat.

Splits are fixed (split seed 0; stratified for classification); features are standardized with
training-split statistics. Training batches follow the run seed's ``order`` stream, the model's
initial weights its ``init`` stream (common random numbers across optimizers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import Problem, Task, epoch_batches, split_indices, stream_seed

__all__ = ["DataProblem", "AddingProblem", "load", "data_problems"]

SPLIT_SEED = 0
FRACTIONS = (0.6, 0.2, 0.2)


@functools.cache
def load(name: str) -> dict[str, Any]:
    """Standardized float32 arrays ``{x,y}_{train,valid,test}`` for one bundled data set."""
    import numpy as np

    if name == "mnist1d":
        x_tr, y_tr, x_te, y_te = _mnist1d()
        n = len(y_tr)
        tr, va = split_indices(n, (0.8, 0.2), SPLIT_SEED, stratify=y_tr.tolist())
        parts = {"train": (x_tr[tr], y_tr[tr]), "valid": (x_tr[va], y_tr[va]),
                 "test": (x_te, y_te)}
        regression = False
    else:
        from sklearn import datasets

        loader = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits,
                  "diabetes": datasets.load_diabetes}[name]
        bunch = loader()
        x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)
        regression = name == "diabetes"
        idx = split_indices(len(y), FRACTIONS, SPLIT_SEED,
                            stratify=None if regression else y.tolist())
        parts = {k: (x[i], y[i]) for k, i in zip(("train", "valid", "test"), idx)}
    mu = parts["train"][0].mean(0)
    sd = parts["train"][0].std(0)
    sd[sd == 0] = 1.0  # constant pixels in digits
    out: dict[str, Any] = {}
    if regression:
        ym, ys = parts["train"][1].mean(), parts["train"][1].std()
    for k, (xk, yk) in parts.items():
        out[f"x_{k}"] = ((xk - mu) / sd).astype(np.float32)
        if regression:
            out[f"y_{k}"] = ((yk - ym) / ys).astype(np.float32)
        else:
            out[f"y_{k}"] = yk.astype(np.int64)
    return out


def _mnist1d() -> tuple:
    """Generate MNIST-1D with the package's own procedure; global RNG state is restored after
    (``make_dataset`` reseeds ``random`` and ``numpy.random`` globally)."""
    import random

    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        ds = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (np.asarray(ds["x"], np.float64), np.asarray(ds["y"]),
            np.asarray(ds["x_test"], np.float64), np.asarray(ds["y_test"]))


def _mlp(sizes: tuple[int, ...], act: str = "relu") -> Callable[[], Any]:
    def make():  # noqa: ANN202
        from torch import nn

        layers: list = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh() if act == "tanh" else nn.ReLU())
        return nn.Sequential(*layers)

    return make


def _cnn_digits():  # noqa: ANN202
    from torch import nn

    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def _init_model(make: Callable[[], Any], seed: int) -> Any:
    """Build a model with the ``init`` stream, leaving torch's global RNG as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "init"))
        return make()


@dataclass
class DataProblem(Problem):
    """A model trained on a bundled data set: cross-entropy (metric: accuracy) or MSE."""

    dataset: str = "digits"
    model: Callable[[], Any] = field(default=_mlp((64, 64, 10)), repr=False)
    regression: bool = False

    def __post_init__(self) -> None:
        self.kind = "data"
        self.metric_name = None if self.regression else "accuracy"

    def build(self, seed: int) -> Task:
        import torch
        import torch.nn.functional as F

        data = load(self.dataset)
        t = {k: torch.from_numpy(v) for k, v in data.items()}
        net = _init_model(self.model, seed)
        params = list(net.parameters())
        g_order = torch.Generator().manual_seed(stream_seed(seed, "order"))
        batches = epoch_batches(len(t["y_train"]), self.batch_size or len(t["y_train"]), g_order)
        regression = self.regression

        def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(out.squeeze(-1), y) if regression else F.cross_entropy(out, y)

        def train_loss() -> torch.Tensor:
            idx = next(batches)
            return loss_fn(net(t["x_train"][idx]), t["y_train"][idx])

        def evaluate(split: str) -> tuple[float, float | None]:
            with torch.no_grad():
                out = net(t[f"x_{split}"])
                y = t[f"y_{split}"]
                loss = float(loss_fn(out, y))
                acc = None if regression else float((out.argmax(1) == y).float().mean())
            return loss, acc

        return Task(params, train_loss, evaluate, None)


def _adding_batch(n: int, length: int, gen: Any) -> tuple:
    import torch

    values = torch.rand((n, length), generator=gen)
    # two distinct marked positions per sequence, one in each half (Le et al. 2015 convention)
    half = length // 2
    i = torch.randint(0, half, (n,), generator=gen)
    j = torch.randint(half, length, (n,), generator=gen)
    markers = torch.zeros((n, length))
    rows = torch.arange(n)
    markers[rows, i] = 1.0
    markers[rows, j] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = values[rows, i] + values[rows, j]
    return x, y


class _LSTMRegressor:
    """LSTM over the sequence, linear read-out of the last hidden state."""

    def __new__(cls, hidden: int):  # noqa: ANN204 - returns an nn.Module
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = nn.LSTM(2, hidden, batch_first=True)
                self.head = nn.Linear(hidden, 1)

            def forward(self, x):  # noqa: ANN001, ANN202
                out, _ = self.rnn(x)
                return self.head(out[:, -1]).squeeze(-1)

        return Net()


@dataclass
class AddingProblem(Problem):
    """LSTM on the adding problem (fresh training sequences every step; fixed valid/test sets)."""

    length: int = 30
    hidden: int = 32
    n_eval: int = 512

    def __post_init__(self) -> None:
        self.kind = "data"
        self.metric_name = None

    def build(self, seed: int) -> Task:
        import torch
        import torch.nn.functional as F

        net = _init_model(lambda: _LSTMRegressor(self.hidden), seed)
        g_split = torch.Generator().manual_seed(stream_seed(SPLIT_SEED, f"adding{self.length}"))
        evalsets = {"valid": _adding_batch(self.n_eval, self.length, g_split),
                    "test": _adding_batch(self.n_eval, self.length, g_split)}
        g_order = torch.Generator().manual_seed(stream_seed(seed, "order"))
        batch = self.batch_size or 32

        def train_loss() -> torch.Tensor:
            x, y = _adding_batch(batch, self.length, g_order)
            return F.mse_loss(net(x), y)

        def evaluate(split: str) -> tuple[float, None]:
            x, y = evalsets[split]
            with torch.no_grad():
                return float(F.mse_loss(net(x), y)), None

        return Task(list(net.parameters()), train_loss, evaluate, None)


def data_problems() -> list[Problem]:
    """Every data problem, in a stable order."""
    return [
        DataProblem("logreg-cancer", "logistic regression on breast cancer (convex control)",
                    steps=300, eval_every=10, batch_size=32, target_tau=0.1,
                    dataset="breast_cancer", model=_mlp((30, 2)), requires=("sklearn",),
                    convex=True),
        # evaluated every step: steps-to-target on it drives the quick suite's profile scores
        DataProblem("mlp-digits", "MLP 64-64-10 (ReLU) on digits 8x8", steps=500, eval_every=1,
                    batch_size=64, target_tau=0.1, dataset="digits", model=_mlp((64, 64, 10)),
                    requires=("sklearn",)),
        DataProblem("cnn-digits", "2-conv CNN on digits 8x8", steps=500, eval_every=25,
                    batch_size=64, target_tau=0.1, dataset="digits", model=_cnn_digits,
                    requires=("sklearn",)),
        DataProblem("mlp-diabetes", "MLP 10-32-1 (tanh) regression on diabetes, MSE",
                    steps=500, eval_every=25, batch_size=32, target_tau=0.1, dataset="diabetes",
                    model=_mlp((10, 32, 1), "tanh"), regression=True, requires=("sklearn",)),
        DataProblem("mlp-mnist1d", "MLP 40-100-100-10 (ReLU) on MNIST-1D (generated locally)",
                    steps=800, eval_every=50, batch_size=64, target_tau=0.1, dataset="mnist1d",
                    model=_mlp((40, 100, 100, 10)), requires=("mnist1d",)),
        # LSTM rather than GRU: on CPU torch's LSTM step is ~1.5x cheaper at this size
        AddingProblem("lstm-adding", "LSTM(32) on the adding problem, length 20, MSE", steps=600,
                      eval_every=25, batch_size=32, target_tau=0.1, length=20, hidden=32),
    ]
