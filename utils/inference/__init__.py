"""The public Python API: ``from utils.inference import TrainedVAE``.

``TrainedVAE`` is imported when first asked for: the CLIs import this package's loaders and modes to answer
``--help`` and bad flags, before torch loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from utils.inference.trained import TrainedVAE

__all__ = ["TrainedVAE"]


def __getattr__(name: str):
    if name == "TrainedVAE":
        from utils.inference.trained import TrainedVAE

        return TrainedVAE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
