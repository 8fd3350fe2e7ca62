"""Data sets held in memory as one uint8 tensor, batched by index.

Why not a DataLoader over PIL images: MNIST-sized sets fit in memory (and on a
GPU) many times over, so decoding each image once at load time and slicing a
tensor per step removes the input pipeline from the profile entirely.

Data order is a pure function of (seed, step): the permutation for epoch e is
drawn from a generator seeded with (seed, e). A resumed run therefore sees
exactly the batches an unbroken run would, with no sampler state to save.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.config import DataConfig
from utils.errors import UserError

TORCHVISION_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


@dataclass
class ImageSet:
    images: torch.Tensor          # (N, C, H, W) uint8
    labels: torch.Tensor | None   # (N,) int64, or None for unlabelled sets

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> ImageSet:
        labels = None if self.labels is None else self.labels.to(device)
        return ImageSet(self.images.to(device), labels)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Images at ``idx`` as float in [0, 1], on the set's device."""
        return self.images[idx].float().div_(255.0)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _load_torchvision(cfg: DataConfig, train: bool) -> ImageSet:
    import torchvision

    cls_name = TORCHVISION_SETS[cfg.name]
    cls = getattr(torchvision.datasets, cls_name)
    raw = Path(cfg.root) / cls_name / "raw"
    try:
        ds = cls(root=cfg.root, train=train, download=cfg.download)
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True ..."
        raise UserError(f"{cls_name} not found in {raw}: put the four IDX files there "
                        f"or set data.download=true (needs internet) [{e}]") from None
    except OSError as e:  # download attempted offline
        raise UserError(f"{cls_name} could not be downloaded ({e.__class__.__name__}): put the four IDX files "
                        f"in {raw} and set data.root={cfg.root}") from None
    images = ds.data.unsqueeze(1)  # (N, 1, 28, 28) uint8
    return ImageSet(_resize(images, cfg.img_size), ds.targets.long())


def load_data(cfg: DataConfig) -> tuple[ImageSet, ImageSet, str]:
    """(train, test, one-line summary) for ``cfg.name``."""
    if cfg.name not in TORCHVISION_SETS:
        raise UserError(f"unknown data.name '{cfg.name}': choose one of {', '.join(TORCHVISION_SETS)}")
    train, test = _load_torchvision(cfg, True), _load_torchvision(cfg, False)
    c, h, w = train.shape
    summary = f"data: {cfg.name} train={len(train)} test={len(test)} shape={c}x{h}x{w} from {cfg.root}"
    return train, test, summary


def image_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of a data set's images after loading, known without reading the data."""
    channels = {"mnist": 1, "fashion_mnist": 1}
    if cfg.name not in channels:
        raise UserError(f"unknown data.name '{cfg.name}': choose one of {', '.join(channels)}")
    return channels[cfg.name], cfg.img_size, cfg.img_size


class BatchOrder:
    """Global batch indices for any step: shuffled epochs, last partial batch dropped."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise UserError(f"train.batch_size={batch_size} is larger than the training set ({n}): lower it")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's contiguous share of a global batch (sizes differ by at most one)."""
    return indices.tensor_split(world)[rank]
