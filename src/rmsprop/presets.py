"""Named option sets that reproduce each published RMSProp exactly.

A preset is only data: the option values of :class:`rmsprop.options.Options` that turn the one
rule of :mod:`rmsprop.spec` into the original. Tests compare each one against the real library
(torch, Keras 3, optax, timm) or a transcription of the paper cited in ``source``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ["Preset", "PRESETS", "resolve_preset"]


@dataclass(frozen=True)
class Preset:
    """One published variant: its option values, whether ``lr`` must be given, and its source."""

    name: str
    options: Mapping[str, Any]
    source: str
    lr_required: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


_PRESETS = [
    Preset(
        "pytorch",
        dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
             eps_in_sqrt=False, initial_square_avg=0.0, lr_in_momentum=False,
             decoupled_weight_decay=False),
        "torch.optim.RMSprop, torch 2.13 (torch/optim/rmsprop.py)",
        notes="eps outside the sqrt; momentum buffer holds g/d and lr is applied after it; "
              "coupled L2 weight decay.",
    ),
    Preset(
        "keras",
        dict(lr=1e-3, alpha=0.9, eps=1e-7, momentum=0.0, centered=False, eps_in_sqrt=True,
             initial_square_avg=0.0, lr_in_momentum=True, decoupled_weight_decay=True),
        "keras.optimizers.RMSprop, Keras 3.15 (keras/src/optimizers/rmsprop.py)",
        notes="rho=0.9, epsilon=1e-7 inside the sqrt; momentum buffer holds lr-scaled steps; "
              "weight_decay is decoupled and lr-scaled, applied before the step.",
    ),
    Preset(
        "tf1",
        dict(alpha=0.9, eps=1e-10, momentum=0.0, centered=False, eps_in_sqrt=True,
             initial_square_avg=1.0, lr_in_momentum=True, decoupled_weight_decay=False),
        "tf.compat.v1.train.RMSPropOptimizer and the ApplyRMSProp / ApplyCenteredRMSProp kernels "
        "(tensorflow/python/training/rmsprop.py, tensorflow/core/kernels/training_ops.cc)",
        lr_required=True,
        notes="learning_rate has no default; decay=0.9, epsilon=1e-10 inside the sqrt; the 'rms' "
              "slot starts at ones; lr inside the momentum buffer; no weight decay.",
    ),
    Preset(
        "optax",
        dict(alpha=0.9, eps=1e-8, momentum=0.0, centered=False, eps_in_sqrt=True,
             initial_square_avg=0.0, lr_in_momentum=True, nesterov=False, bias_correction=False,
             decoupled_weight_decay=False),
        "optax.rmsprop, optax 0.2.8 (optax/_src/alias.py, optax/_src/transform.py)",
        lr_required=True,
        notes="learning_rate has no default; decay=0.9, eps=1e-8 inside the sqrt; momentum is "
              "optax.trace after lr scaling (buffer holds lr-scaled updates); initial_scale, "
              "nesterov and bias_correction map to initial_square_avg, nesterov, bias_correction.",
    ),
    Preset(
        "timm",
        dict(lr=1e-2, alpha=0.9, eps=1e-10, momentum=0.0, centered=False, eps_in_sqrt=True,
             initial_square_avg=1.0, lr_in_momentum=True, decoupled_weight_decay=False),
        "timm.optim.RMSpropTF, timm 1.0.31 (timm/optim/rmsprop_tf.py)",
        notes="alpha=0.9, eps=1e-10 inside the sqrt; square_avg starts at ones; "
              "lr_in_momentum=True; decoupled_decay maps to decoupled_weight_decay. The "
              "EfficientNet recipe is lr=0.016, eps=1e-3, momentum=0.9.",
    ),
    Preset(
        "hinton2012",
        dict(alpha=0.9, eps=0.0, momentum=0.0, centered=False, eps_in_sqrt=False,
             initial_square_avg=0.0, lr_in_momentum=False, decoupled_weight_decay=False),
        "Tieleman & Hinton, CSC321 lecture 6e slide 'rmsprop: A mini-batch version of rprop' "
        "(2012): MeanSquare = 0.9*MeanSquare + 0.1*g^2; w -= lr*g/sqrt(MeanSquare)",
        lr_required=True,
        notes="the slide gives no lr, no epsilon and no initial value: lr must be given, eps is 0 "
              "(a warning says a zero gradient then gives NaN; pass eps to override) and v starts "
              "at 0.",
    ),
    Preset(
        "graves2013",
        dict(lr=1e-4, alpha=0.95, eps=1e-4, momentum=0.9, centered=True, eps_in_sqrt=True,
             initial_square_avg=0.0, lr_in_momentum=True, decoupled_weight_decay=False),
        "Graves, 'Generating Sequences With Recurrent Neural Networks', arXiv:1308.0850v5, "
        "section 4, eqs. (38)-(41), p. 23: aleph=0.95, beth=0.9, gimel=1e-4, k=1e-4",
        notes="centered, eps inside the sqrt, lr inside the momentum term; the paper does not "
              "state initial values, zeros are used as in its re-implementations.",
    ),
    Preset(
        "dqn2015",
        dict(lr=2.5e-4, alpha=0.95, eps=0.01, momentum=0.0, centered=True, eps_in_sqrt=True,
             initial_square_avg=0.0, lr_in_momentum=False, weight_decay=0.0,
             decoupled_weight_decay=False),
        "Mnih et al., 'Human-level control through deep reinforcement learning', Nature 518 "
        "(2015), Extended Data Table 1 (learning rate 0.00025, gradient momentum 0.95, squared "
        "gradient momentum 0.95, min squared gradient 0.01); DeepMind's code "
        "github.com/deepmind/dqn@9d9b1d1, dqn/NeuralQLearner.lua, nql:qLearnMinibatch: "
        "g = 0.95 g + 0.05 dw; g2 = 0.95 g2 + 0.05 dw^2; w += lr dw / sqrt(g2 - g^2 + 0.01)",
        notes="the centered rule of graves2013 without momentum, eps=0.01 inside the sqrt; g and "
              "g2 start at zeros (fill(0)); dw is the negated gradient; the Lua weight cost wc "
              "(dw -= wc w) is coupled L2, our weight_decay; run_gpu keeps lr constant.",
    ),
    Preset(
        "sb3",
        dict(lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, centered=False, eps_in_sqrt=True,
             initial_square_avg=1.0, lr_in_momentum=False, weight_decay=0.0,
             decoupled_weight_decay=False),
        "stable_baselines3.common.sb2_compat.rmsprop_tf_like.RMSpropTFLike, Stable-Baselines3 "
        "2.9.2 (stable_baselines3/common/sb2_compat/rmsprop_tf_like.py)",
        notes="TF1's rule (eps inside the sqrt, square_avg starts at ones) with torch's momentum: "
              "the buffer holds g/d and lr is applied after it; torch's defaults alpha=0.99, "
              "eps=1e-8, lr=1e-2; coupled L2 weight decay. SB3's A2C on Atari (RL Zoo) uses it "
              "with eps=1e-5.",
    ),
]

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _PRESETS})


def resolve_preset(name: str, overrides: Mapping[str, Any],
                   params: Sequence[Any] = ()) -> dict[str, Any]:
    """Return the preset's options updated with ``overrides``; raise ``ValueError`` for an
    unknown preset or a missing required ``lr`` (given either in ``overrides`` or in every
    param-group dict of ``params``)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    every_group_has_lr = bool(params) and all(isinstance(g, dict) and "lr" in g
                                              for g in params)
    if preset.lr_required and "lr" not in overrides and not every_group_has_lr:
        raise ValueError(f"Preset {name!r} has no default learning rate ({preset.source}); "
                         "pass lr=...")
    return {**preset.options, **overrides}
