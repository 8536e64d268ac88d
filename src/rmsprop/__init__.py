"""rmsprop: RMSProp, exact in every published variant, fast, and easy to trust.

Backends: :mod:`rmsprop.numpy` (the executable spec), :mod:`rmsprop.torch` (a drop-in for
``torch.optim.RMSprop``), :mod:`rmsprop.optax` (GradientTransformations). The rule itself is
:func:`rmsprop.spec.step`; the named variants are :data:`PRESETS`. ``rmsprop.compare`` is the
Python API of ``rmsprop compare`` (:mod:`rmsprop.tools.compare`), imported on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .options import Options
from .presets import PRESETS, Preset

#: The package version: the one place it is written (pyproject.toml reads it from here, and
#: ``rmsprop --version`` prints it).
__version__ = "0.1.0"
__all__ = ["Options", "PRESETS", "Preset", "__version__"]

# Tools reachable as attributes without being imported by ``import rmsprop``: they import torch
# and the plotting stack, which the NumPy core must not pay for.
_LAZY = {"compare": "rmsprop.tools.compare"}


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'rmsprop' has no attribute {name!r}")
