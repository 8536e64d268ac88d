"""Stable-Baselines3's A2C trained with rmsprop.torch.RMSprop, saved, loaded and trained on.

    pip install stable-baselines3        # pulls gymnasium; keep torch==2.13.0 installed first
    python examples/sb3_a2c.py                       # SB3's default A2C optimizer settings
    python examples/sb3_a2c.py --preset sb3          # RL Zoo's RMSpropTFLike, as our preset
    python examples/sb3_a2c.py --timesteps 2000      # a smoke run

SB3's A2C builds its optimizer as ``optimizer_class(policy.parameters(), lr=..., **kwargs)``
and writes the learning rate into the param groups before every update, so our class is a
drop-in through ``policy_kwargs``. By default A2C uses ``torch.optim.RMSprop(alpha=0.99,
eps=1e-5, weight_decay=0)``; ``--preset sb3`` uses the options of SB3's ``RMSpropTFLike``
(epsilon inside the square root, square average starting at 1) with the RL Zoo's eps=1e-5.
``model.save`` stores the optimizer's state dict and ``A2C.load`` restores it into our class.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, save, load, train on; print what happened at each stage."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timesteps", type=int, default=30_000,
                    help="environment steps to train for (default 30000)")
    ap.add_argument("--preset", choices=["none", "sb3"], default="none",
                    help="'sb3': our preset of SB3's RMSpropTFLike instead of A2C's default "
                         "torch-style RMSprop settings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.timesteps < 1:
        print(f"sb3_a2c.py: --timesteps must be >= 1, got {args.timesteps}", file=sys.stderr)
        return 2
    try:
        from stable_baselines3 import A2C
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.evaluation import evaluate_policy
        from stable_baselines3.common.logger import Logger
    except ModuleNotFoundError as e:
        print(f"sb3_a2c.py needs Stable-Baselines3 ({e}): pip install stable-baselines3",
              file=sys.stderr)
        return 1

    import rmsprop
    from rmsprop.torch import RMSprop

    if args.preset == "sb3":
        # SB3 passes lr itself (learning_rate=7e-4 for A2C): every preset option but lr
        kwargs = {k: v for k, v in rmsprop.PRESETS["sb3"].options.items() if k != "lr"}
        kwargs["eps"] = 1e-5
    else:
        kwargs = dict(alpha=0.99, eps=1e-5, weight_decay=0.0)  # A2C's own default
    env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)
    model = A2C("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0,
                policy_kwargs=dict(optimizer_class=RMSprop, optimizer_kwargs=kwargs))
    # no log files: SB3's default logger makes a folder under the temp dir for every learn()
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.learn(total_timesteps=args.timesteps)
    mean, std = evaluate_policy(model, env, n_eval_episodes=10, deterministic=True)
    opt = model.policy.optimizer
    first = next(model.policy.parameters())
    print(f"trained {args.timesteps} steps with {type(opt).__module__}.{type(opt).__name__} "
          f"({int(opt.state[first]['step'])} updates): mean return {mean:.1f} +- {std:.1f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a2c_cartpole")
        model.save(path)
        loaded = A2C.load(path, env=env, device="cpu")
    loaded.set_logger(Logger(folder=None, output_formats=[]))
    lopt = loaded.policy.optimizer
    same = all(
        (a == b).all() for k in opt.state_dict()["state"]
        for a, b in zip(opt.state_dict()["state"][k].values(),
                        lopt.state_dict()["state"][k].values()))
    print(f"loaded: optimizer {type(lopt).__name__}, state identical to the saved one: {same}")
    loaded.learn(total_timesteps=max(args.timesteps // 10, 1), reset_num_timesteps=False)
    mean2, _ = evaluate_policy(loaded, env, n_eval_episodes=10, deterministic=True)
    print(f"trained on after loading: {int(lopt.state[next(loaded.policy.parameters())]['step'])}"
          f" updates, mean return {mean2:.1f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
