"""Ground-truth factors of a data set: what the disentanglement scores need to know of it.

A data set made from known factors (dSprites: shape, scale, orientation, position) declares them as one
``Factors`` on its splits (``ImageSplit.factors``): their names, how many classes each takes, and the images
of any given factor classes. The scores draw factor classes, ask for those images, and compare the model's
codes with the classes; they never need to know which data set it is. The set's ``DATASETS`` entry says
``has_factors``, so that ``evaluate.py`` can choose its metrics before any data is read.

This module imports no torch at load: the declarations are read where torch is not loaded yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Factors:
    """``names`` and ``sizes`` (classes per factor, in the order of a classes row), and ``images``: factor classes
    (N, len(sizes)) int64 -> those images, float (N, C, H, W) in [0, 1] on the classes' device. Every
    combination of classes must have an image: the scores draw them uniformly from the whole grid."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    images: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sizes) or not self.sizes or min(self.sizes) < 2:
            raise ValueError(f"factors {self.names} with sizes {self.sizes}: one size of at least 2 per name")
