"""rmsprop.torch.RMSprop in a PyTorch Lightning module: return it from configure_optimizers.

    python examples/lightning_rmsprop.py            # a few hundred steps on synthetic data

Any preset works the same way (``RMSprop.from_preset("keras", self.parameters())``), and so do
Lightning's mixed precision (``precision="bf16-mixed"``) and its LR schedulers.
"""

from __future__ import annotations

import sys

import torch

try:
    import lightning as L
except ModuleNotFoundError:
    sys.exit("examples/lightning_rmsprop.py needs PyTorch Lightning: pip install lightning")

from rmsprop.torch import RMSprop


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2, preset: str = "pytorch") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return RMSprop.from_preset(self.hparams.preset, self.parameters(), lr=self.hparams.lr)


def synthetic(n: int = 512, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def main() -> None:
    loader = torch.utils.data.DataLoader(synthetic(), batch_size=32, shuffle=True)
    trainer = L.Trainer(max_epochs=10, accelerator="cpu", logger=False,
                        enable_checkpointing=False)
    trainer.fit(Regressor(), loader)


if __name__ == "__main__":
    main()
