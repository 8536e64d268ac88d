"""rmsprop.torch.RMSprop with the Hugging Face ``transformers.Trainer``.

    python examples/hf_trainer_rmsprop.py

Two ways to hand it over: ``Trainer(..., optimizers=(RMSprop(model.parameters()), scheduler))``
with an optimizer you built, or ``optimizer_cls_and_kwargs=(RMSprop, {...})`` to let the Trainer
build it on the model it prepared. The model here is a plain ``torch.nn.Module`` whose forward
returns ``{"loss": ...}``; any ``PreTrainedModel`` works the same way.
"""

from __future__ import annotations

import sys
import tempfile

import torch

try:  # the Trainer needs accelerate too, but imports it only when it builds its arguments
    import accelerate  # noqa: F401
    from transformers import Trainer, TrainingArguments
except ModuleNotFoundError:
    sys.exit("examples/hf_trainer_rmsprop.py needs Hugging Face transformers and accelerate: "
             "pip install transformers accelerate")

from rmsprop.torch import RMSprop


class Regressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        if labels is None:
            return {"logits": out}
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 512, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def main() -> None:
    model = Regressor()
    opt = RMSprop.from_preset("pytorch", model.parameters(), lr=1e-2)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, num_train_epochs=5, per_device_train_batch_size=32,
                                 report_to=[], save_strategy="no", use_cpu=True,
                                 logging_steps=20)
        Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(opt, None)).train()


if __name__ == "__main__":
    main()
