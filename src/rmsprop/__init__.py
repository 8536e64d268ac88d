"""rmsprop: RMSProp, exact in every published variant, fast, and easy to trust.

Backends: :mod:`rmsprop.numpy` (the executable spec), :mod:`rmsprop.torch` (a drop-in for
``torch.optim.RMSprop``), :mod:`rmsprop.optax` (GradientTransformations). The rule itself is
:func:`rmsprop.spec.step`; the named variants are :data:`PRESETS`.
"""

from .options import Options
from .presets import PRESETS, Preset

__version__ = "0.1.0"
__all__ = ["Options", "PRESETS", "Preset", "__version__"]
