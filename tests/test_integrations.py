"""Training frameworks accept rmsprop.torch.RMSprop: PyTorch Lightning (returned from
configure_optimizers), Hugging Face transformers.Trainer (optimizer_cls_and_kwargs) and
Stable-Baselines3's A2C (policy_kwargs optimizer_class). Oracle: the same training with
torch.optim.RMSprop (the "pytorch" preset is torch's rule) — written as a plain loop, or SB3's
own A2C with its default optimizer — so the framework must neither skip nor add anything to the
steps. Skipped when the framework is not installed (``pip install lightning transformers
accelerate stable-baselines3``)."""

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


# -- Stable-Baselines3 ---------------------------------------------------------------------------

def _a2c(optimizer_class, optimizer_kwargs, **kw):
    """SB3's A2C on CartPole-v1, 4 envs x 5 steps per update, fixed seed, on the CPU."""
    from stable_baselines3 import A2C
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("CartPole-v1", n_envs=4, seed=0)
    model = A2C("MlpPolicy", env, seed=0, device="cpu", verbose=0, **kw,
                policy_kwargs=dict(optimizer_class=optimizer_class,
                                   optimizer_kwargs=optimizer_kwargs))
    return _quiet(model)


def _quiet(model):
    """A logger with no outputs: SB3's default one makes a folder under the temp dir per run."""
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


_needs_sb3 = pytest.mark.skipif(importlib.util.find_spec("stable_baselines3") is None,
                                reason="needs stable-baselines3")


@_needs_sb3
@pytest.mark.parametrize("path", [{"fused": False}, {}], ids=["for-loop", "default"])
def test_sb3_a2c_trains_like_its_default_rmsprop(path):
    """SB3's A2C uses torch.optim.RMSprop(alpha=0.99, eps=1e-5, weight_decay=0) by default, with
    the lr SB3 writes into the param groups before every update: ours in its place
    takes the same 25 updates (bit-identical on the for-loop path, ulps on the fused one)."""
    kwargs = dict(alpha=0.99, eps=1e-5, weight_decay=0)
    ref = _a2c(torch.optim.RMSprop, kwargs)
    ref.learn(total_timesteps=500)
    ours = _a2c(RMSprop, {**kwargs, **path})
    ours.learn(total_timesteps=500)
    assert isinstance(ours.policy.optimizer, RMSprop)
    opt = ours.policy.optimizer
    assert int(opt.state[next(ours.policy.parameters())]["step"]) == 25
    tol = dict(rtol=0, atol=0) if path else dict(rtol=1e-4, atol=1e-6)
    for a, b in zip(ours.policy.parameters(), ref.policy.parameters()):
        torch.testing.assert_close(a, b, **tol)


@_needs_sb3
def test_sb3_a2c_with_the_sb3_preset_trains_like_rmsproptflike():
    """RL Zoo's A2C setting (RMSpropTFLike, eps=1e-5) against our ``sb3`` preset in its place."""
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

    import rmsprop

    preset = {k: v for k, v in rmsprop.PRESETS["sb3"].options.items() if k != "lr"}
    ref = _a2c(RMSpropTFLike, dict(alpha=0.99, eps=1e-5))
    ref.learn(total_timesteps=500)
    ours = _a2c(RMSprop, {**preset, "eps": 1e-5, "fused": False})
    ours.learn(total_timesteps=500)
    for a, b in zip(ours.policy.parameters(), ref.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@_needs_sb3
def test_sb3_a2c_save_and_load_round_trip_the_optimizer_state(tmp_path):
    """``model.save`` / ``A2C.load`` keep our optimizer (class, options, state), and the loaded
    model continues with it."""
    from stable_baselines3 import A2C

    model = _a2c(RMSprop, dict(alpha=0.99, eps=1e-5, momentum=0.5, centered=True))
    model.learn(total_timesteps=200)
    model.save(tmp_path / "a2c")
    loaded = _quiet(A2C.load(tmp_path / "a2c", env=model.get_env(), device="cpu"))
    a, b = model.policy.optimizer, loaded.policy.optimizer
    assert type(b) is RMSprop
    assert b.param_groups[0]["momentum"] == 0.5 and b.param_groups[0]["centered"] is True
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys() >= {"step", "square_avg",
                                                                    "momentum_buffer",
                                                                    "grad_avg"}
        for name, value in sa["state"][k].items():
            torch.testing.assert_close(sb["state"][k][name], value, rtol=0, atol=0)
    loaded.learn(total_timesteps=40, reset_num_timesteps=False)
    step = b.state[next(loaded.policy.parameters())]["step"]
    assert int(step) == 10 + 2  # 200 / (4 envs x 5 steps), then two more updates


@_needs_sb3
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["none", "sb3"])
def test_sb3_example_runs(preset, capsys):
    """examples/sb3_a2c.py with a small budget: trains, saves, loads with the state intact."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sb3_a2c.py"
    spec = importlib.util.spec_from_file_location("_sb3_a2c_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--timesteps", "400", "--preset", preset]) == 0
    out = capsys.readouterr().out
    assert "(10 updates)" in out and "state identical to the saved one: True" in out
    assert "trained on after loading: 11 updates" in out
