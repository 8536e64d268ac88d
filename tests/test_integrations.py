"""Training frameworks accept rmsprop.torch.RMSprop: PyTorch Lightning (returned from
configure_optimizers) and Hugging Face transformers.Trainer (optimizer_cls_and_kwargs). Oracle:
the same training written as a plain loop with torch.optim.RMSprop (the "pytorch" preset is
torch's rule), so the framework must neither skip nor add anything to the steps. Skipped when
the framework is not installed (``pip install lightning transformers accelerate``)."""

from __future__ import annotations

import importlib.util
import logging
import warnings

import pytest

torch = pytest.importorskip("torch")

from rmsprop.torch import RMSprop  # noqa: E402

STEPS = 4
OPTS = dict(lr=1e-2, momentum=0.5, centered=True)


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def rows(n: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return x, x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)


def plain_loop(batches):
    """The oracle: torch.optim.RMSprop over the given batches."""
    net = make_net()
    opt = torch.optim.RMSprop(net.parameters(), **OPTS, foreach=False)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs lightning")
def test_lightning_trainer_steps_like_the_plain_loop(tmp_path):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return RMSprop(self.parameters(), **OPTS)

    x, y = rows(32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Module()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(module, loader)
    ref = plain_loop([(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)][:STEPS])
    for a, b in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fused vs for-loop: ulps
    opt = module.trainer.optimizers[0]
    assert isinstance(opt, RMSprop)
    assert int(opt.state[next(module.net.parameters())]["step"]) == STEPS


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("accelerate") is None,
                    reason="needs transformers and accelerate")
def test_hf_trainer_builds_and_steps_our_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    x, y = rows(16)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    # one batch = the whole data set, so the Trainer's shuffling changes only the summation
    # order; no clipping, constant lr: the rule's steps and nothing else
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS,
                             per_device_train_batch_size=16, max_grad_norm=0.0,
                             lr_scheduler_type="constant", learning_rate=OPTS["lr"],
                             weight_decay=0.0, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    model = Model()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(),
                      optimizer_cls_and_kwargs=(RMSprop, {k: v for k, v in OPTS.items()
                                                          if k != "lr"}))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(inner, RMSprop)
    ref = plain_loop([(x, y)] * STEPS)
    for a, b in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
