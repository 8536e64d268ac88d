"""Reinforcement learning: an A2C actor-critic on Gymnasium's CartPole-v1.

The environment is Gymnasium's own batched CartPole (``gymnasium.make_vec("CartPole-v1",
vectorization_mode="vector_entry_point")``, the ``CartPoleVectorEnv`` that steps every copy in
one NumPy call with the dynamics of ``CartPoleEnv``): pure Python, offline, nothing to render.

The learner is synchronous advantage actor-critic (A2C; Mnih et al. 2016, "Asynchronous Methods
for Deep Reinforcement Learning", the synchronous form of OpenAI Baselines and Stable-Baselines3),
with SB3's ``MlpPolicy`` shapes: separate actor and critic MLPs 4-64-64 (tanh), orthogonal
initialisation with gains sqrt(2) / 0.01 (policy head) / 1 (value head). One optimizer step is one
update from a rollout of ``n_steps`` steps in each of ``n_envs`` environments::

    R_t = r_t + gamma * (1 - terminated_t) * (V(s_{t+1}) if truncated_t or t is the last step
                                              else R_{t+1})
    A_t = R_t - V(s_t)                                  (V detached: a fixed baseline)
    loss = -mean(A_t log pi(a_t | s_t)) + vf_coef * mean((R_t - V(s_t))^2)
           - ent_coef * mean(entropy(pi(. | s_t)))

(truncation at 500 steps bootstraps from the value of the last observation, as SB3 does; the
autoreset step that follows every finished episode carries no action and is left out).

Evaluation plays ``n_eval`` greedy episodes (argmax action) on environments whose seeds are fixed
per split, independent of the run seed; the evaluation loss is the shortfall ``500 - mean
return`` (0 = every episode balanced to the time limit), the metric the mean return. Its
``target_loss`` is 25: steps-to-target is the first update whose greedy policy returns 475 or
more on average, the usual "solved" bar of CartPole-v1.

Common random numbers: ``seed=k`` fixes the networks' initial weights (``init`` stream), the
training environments' seeds (``env`` stream) and the uniforms that sample actions (``actions``
stream), so every optimizer sees the same start, and the same episodes for as long as its policy
acts alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Problem, Task, stream_seed

__all__ = ["A2CCartPole", "rl_problems", "MAX_RETURN", "n_step_returns", "greedy_returns"]

#: CartPole-v1's time limit: the most return an episode can collect
MAX_RETURN = 500.0
SPLIT_SEED = 0


def _make_env(n: int, seed: int) -> Any:
    """``n`` CartPole-v1 copies in Gymnasium's batched implementation, reset with ``seed``."""
    import gymnasium as gym

    env = gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
    obs, _ = env.reset(seed=int(seed) % 2**32)
    return env, obs


def _mlp(out: int, gain: float) -> Any:
    """4-64-64-``out`` tanh MLP with orthogonal weights and zero biases (SB3's init)."""
    import torch
    from torch import nn

    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, out))
    for i, m in enumerate(layer for layer in net if isinstance(layer, nn.Linear)):
        nn.init.orthogonal_(m.weight, gain=gain if i == 2 else 2 ** 0.5)
        torch.nn.init.zeros_(m.bias)
    return net


def _actor_critic(seed: int) -> tuple[Any, Any]:
    """Actor (2 logits) and critic (1 value) built from the ``init`` stream; torch's global RNG
    is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "init"))
        return _mlp(2, 0.01), _mlp(1, 1.0)


def greedy_returns(actor: Any, n: int, seed: int, max_steps: int = int(MAX_RETURN)) -> list[float]:
    """Returns of ``n`` episodes played with ``argmax`` actions, one per environment copy (the
    autoreset after an episode ends is never counted)."""
    import numpy as np
    import torch

    env, obs = _make_env(n, seed)
    total = np.zeros(n)
    alive = np.ones(n, dtype=bool)
    with torch.no_grad():
        for _ in range(max_steps):
            act = actor(torch.from_numpy(obs)).argmax(-1).numpy()
            obs, rew, term, trunc, _ = env.step(act)
            total += rew * alive
            alive &= ~(term | trunc)
            if not alive.any():
                break
    env.close()
    return total.tolist()


def n_step_returns(rew: Any, term: Any, trunc: Any, next_value: Any, gamma: float) -> Any:
    """A2C's bootstrapped returns of a rollout, all tensors ``(T, n_envs)``.

    ``R_t = r_t + gamma (1 - terminated_t) B_t`` with ``B_t = V(s_{t+1})`` (``next_value[t]``)
    where the rollout is cut (a truncated episode, or the last step) and ``B_t = R_{t+1}``
    otherwise: a terminated episode contributes nothing past its end, a truncated one its
    critic's estimate.
    """
    import torch

    ret = torch.empty_like(rew)
    following = next_value[-1]
    last = rew.shape[0] - 1
    for t in range(last, -1, -1):
        boot = next_value[t] if t == last else torch.where(trunc[t], next_value[t], following)
        ret[t] = rew[t] + gamma * (~term[t]) * boot
        following = ret[t]
    return ret


@dataclass
class A2CCartPole(Problem):
    """A2C on CartPole-v1: ``n_envs`` x ``n_steps`` transitions per update (see module doc)."""

    n_envs: int = 16
    n_steps: int = 8
    gamma: float = 0.99
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    n_eval: int = 16

    def __post_init__(self) -> None:
        self.kind = "rl"
        self.metric_name = "return"

    @property
    def env_steps_per_update(self) -> int:
        """Environment steps collected for one optimizer step."""
        return self.n_envs * self.n_steps

    def build(self, seed: int) -> Task:
        import torch
        import torch.nn.functional as F

        actor, critic = _actor_critic(seed)
        params = list(actor.parameters()) + list(critic.parameters())
        env, first_obs = _make_env(self.n_envs, stream_seed(seed, "env"))
        g_act = torch.Generator().manual_seed(stream_seed(seed, "actions"))
        state = {"obs": torch.from_numpy(first_obs), "reset_next": torch.zeros(self.n_envs,
                                                                               dtype=torch.bool)}
        n, t_len, gamma = self.n_envs, self.n_steps, self.gamma

        def train_loss() -> torch.Tensor:
            obs = torch.empty(t_len + 1, n, 4)
            act = torch.empty(t_len, n, dtype=torch.long)
            rew = torch.empty(t_len, n)
            term = torch.empty(t_len, n, dtype=torch.bool)
            trunc = torch.empty(t_len, n, dtype=torch.bool)
            real = torch.empty(t_len, n, dtype=torch.bool)
            obs[0] = state["obs"]
            with torch.no_grad():
                for t in range(t_len):
                    p1 = torch.softmax(actor(obs[t]), -1)[:, 1]
                    a = (torch.rand(n, generator=g_act) < p1).long()
                    o, r, te, tr, _ = env.step(a.numpy())
                    # the step after an episode's end only resets that copy: no transition
                    real[t] = ~state["reset_next"]
                    obs[t + 1] = torch.from_numpy(o)
                    act[t], rew[t] = a, torch.from_numpy(r)
                    term[t], trunc[t] = torch.from_numpy(te), torch.from_numpy(tr)
                    state["reset_next"] = term[t] | trunc[t]
                ret = n_step_returns(rew, term, trunc, critic(obs[1:]).squeeze(-1), gamma)
            state["obs"] = obs[-1].clone()
            flat_obs = obs[:-1].reshape(-1, 4)
            mask = real.reshape(-1).float()
            logits = actor(flat_obs)
            value = critic(flat_obs).squeeze(-1)
            logp_all = F.log_softmax(logits, -1)
            logp = logp_all.gather(1, act.reshape(-1, 1)).squeeze(1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            r = ret.reshape(-1)
            adv = r - value.detach()
            count = mask.sum().clamp_min(1.0)
            policy_loss = -(adv * logp * mask).sum() / count
            value_loss = ((r - value) ** 2 * mask).sum() / count
            ent = (entropy * mask).sum() / count
            return policy_loss + self.vf_coef * value_loss - self.ent_coef * ent

        eval_seeds = {s: stream_seed(SPLIT_SEED, f"cartpole-{s}") for s in ("valid", "test")}

        def evaluate(split: str) -> tuple[float, float]:
            mean = sum(greedy_returns(actor, self.n_eval, eval_seeds[split])) / self.n_eval
            return MAX_RETURN - mean, mean

        return Task(params, train_loss, evaluate, None)


def rl_problems() -> list[Problem]:
    """Every reinforcement-learning problem, in a stable order."""
    return [
        A2CCartPole("a2c-cartpole", "A2C actor-critic (MLP 64-64 tanh) on Gymnasium CartPole-v1, "
                    "16 envs x 8 steps per update; loss 500 - greedy return",
                    steps=400, eval_every=20, batch_size=128, target_tau=0.05,
                    target_loss=25.0, requires=("gymnasium",)),
    ]
