"""PyTorch backend: :class:`RMSprop` (a drop-in for ``torch.optim.RMSprop``) and atomic
checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`)."""

from __future__ import annotations

from typing import Any

from .optimizer import NonFiniteGradientError, RMSprop

try:  # registers the quantized state formats ("8bit", "4bit") with the codec registry
    from . import _quantized  # noqa: F401
except ImportError:
    pass

__all__ = ["RMSprop", "NonFiniteGradientError", "save_checkpoint", "load_checkpoint",
           "read_checkpoint_header", "CheckpointError"]


def __getattr__(name: str) -> Any:
    if name in ("save_checkpoint", "load_checkpoint", "read_checkpoint_header",
                "CheckpointError"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
