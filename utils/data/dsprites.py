"""dSprites (Matthey et al. 2017): 64x64 binary sprites from five ground-truth factors.

Either the official ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (its
``imgs`` array is copied once to an uncompressed .npy and memory-mapped, so the
3 GB are never held in memory), or a procedural renderer with the same factor
grid: 3 shapes (square, ellipse, heart) x 6 scales in [0.5, 1] x 40 orientations
in [0, 2π) x 32 x 32 positions = 737,280 images. The renderer draws a batch at
once from its indices, vectorised, on any device; the same index always gives
the same image.

Index order is the official one: posY varies fastest, then posX, orientation,
scale, shape.
"""

from __future__ import annotations

import math
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.data.factors import Factors
from utils.data.splits import ImageSplit, read_cache, seeded_split
from utils.errors import UserError
from utils.files import private_temporary, remove_stale_temporaries

if TYPE_CHECKING:
    from utils.data.config import DataConfig

OFFICIAL_NAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
N_IMAGES = math.prod(FACTOR_SIZES)  # 737,280
SIZE = 64


def factor_values() -> list[torch.Tensor]:
    """The value of each class of each factor, as in the official ``latents_values``."""
    return [torch.arange(1.0, 4.0), torch.linspace(0.5, 1.0, 6),
            torch.arange(40) * (2 * math.pi / 40), torch.linspace(0, 1, 32), torch.linspace(0, 1, 32)]


def index_to_classes(idx: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) -> factor classes (N, 5), mixed radix with pos_y fastest."""
    out, rest = [], idx.long()
    for size in reversed(FACTOR_SIZES):
        out.append(rest % size)
        rest = rest // size
    return torch.stack(out[::-1], dim=1)


def classes_to_index(classes: torch.Tensor) -> torch.Tensor:
    """Factor classes (N, 5) -> flat indices (N,), on the classes' device."""
    idx = torch.zeros(classes.shape[0], dtype=torch.long, device=classes.device)
    for k, size in enumerate(FACTOR_SIZES):
        idx = idx * size + classes[:, k].long()
    return idx


def render(idx: torch.Tensor) -> torch.Tensor:
    """Sprites for flat indices (N,): uint8 (N, 1, 64, 64) in {0, 255}, on idx's device."""
    c = index_to_classes(idx)
    vals = [v.to(idx.device) for v in factor_values()]
    shape, scale, angle = c[:, 0], vals[1][c[:, 1]], vals[2][c[:, 2]]
    # sprite centre in pixels: positions in [0, 1] span the canvas, leaving room for the largest sprite
    cx, cy = 12 + vals[3][c[:, 3]] * 39, 12 + vals[4][c[:, 4]] * 39
    ys, xs = torch.meshgrid(torch.arange(SIZE, device=idx.device, dtype=torch.float32) + 0.5,
                            torch.arange(SIZE, device=idx.device, dtype=torch.float32) + 0.5, indexing="ij")
    dx, dy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)  # (N, 64, 64)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    radius = (10.0 * scale).view(-1, 1, 1)
    u, v = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius  # sprite frame, unit size
    square = torch.maximum(u.abs(), v.abs()) <= 0.85
    ellipse = (u / 1.0).pow(2) + (v / 0.5).pow(2) <= 1.0
    hx, hy = u * 1.15, -v * 1.15 + 0.25  # heart curve (x² + y² − 1)³ ≤ x² y³, point up in the sprite frame
    heart = (hx.pow(2) + hy.pow(2) - 1).pow(3) - hx.pow(2) * hy.pow(3) <= 0
    masks = torch.stack([square, ellipse, heart], dim=1)  # (N, 3, 64, 64)
    img = masks.gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, SIZE, SIZE))
    return img.to(torch.uint8) * 255


def official_images(npz: Path, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(memory-mapped imgs (N, 64, 64) uint8 in {0, 1}, latents_classes (N, 6)) from the official file.

    The ``imgs`` member is copied once, streaming, to ``cache_dir`` as a plain
    .npy; no pickled object in the file is ever loaded.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / "dsprites_imgs.npy"
    remove_stale_temporaries(cache_dir)  # copies killed half-way
    try:
        with zipfile.ZipFile(npz) as zf:
            with zf.open("imgs.npy") as f:  # the array's shape, from its .npy header
                header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f)[0] == 1
                          else np.lib.format.read_array_header_2_0)
                shape = header(f)[0]
            if read_cache(target, shape) is None:  # none yet, or a damaged one (deleted)
                tmp = private_temporary(target)
                with zf.open("imgs.npy") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
                tmp.replace(target)
            with zf.open("latents_classes.npy") as f:
                classes = np.load(f, allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        raise UserError(f"{npz} is not a readable dSprites npz ({e}): re-download it or remove it "
                        f"to use the procedural renderer") from None
    return np.load(target, mmap_mode="c"), classes  # copy-on-write: never changes the file


@dataclass
class DSpritesImages(ImageSplit):
    indices: torch.Tensor  # (N,) flat indices into the 737,280-image factor grid
    official: torch.Tensor | None = None     # the official imgs (737280, 64, 64) in {0, 1}, memory-mapped
    official_classes: np.ndarray | None = None  # the official latents_classes (737280, 6)
    shape = (1, 64, 64)
    labels = None

    @property
    def reading(self) -> str:
        return "memory-mapped" if self.official is not None else "rendered per batch"

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        flat = self.indices[idx.cpu()]
        if self.official is not None:
            return (self.official[flat].unsqueeze(1) * 255).to(idx.device)
        return render(flat.to(idx.device))

    def factors_at(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes (N, 5), values (N, 5)) of the ground-truth factors of the images at ``idx``."""
        flat = self.indices[idx.cpu()]
        if self.official_classes is not None:
            classes = torch.from_numpy(self.official_classes[flat.numpy(), 1:]).long()
        else:
            classes = index_to_classes(flat)
        values = torch.stack([v[classes[:, k]] for k, v in enumerate(factor_values())], 1)
        return classes, values

    @property
    def factors(self) -> Factors:
        """The five factors, with the image of any classes from the whole grid (737,280 images, both splits),
        read as this split reads them: what the disentanglement scores draw from."""
        grid = DSpritesImages(torch.arange(N_IMAGES), self.official, self.official_classes)
        return Factors(FACTOR_NAMES, FACTOR_SIZES, lambda classes: grid.batch(classes_to_index(classes)))


def load_dsprites(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[ImageSplit, ImageSplit, str]:
    """The official npz under data.root when it is there (memory-mapped), else the renderer; a seeded split."""
    npz = Path(cfg.root) / OFFICIAL_NAME
    official, classes, n, source = None, None, N_IMAGES, "procedural renderer"
    if npz.is_file():
        imgs, classes = official_images(npz, Path(cfg.cache_dir))
        official, n, source = torch.from_numpy(imgs), len(imgs), str(npz)
    train_idx, test_idx = seeded_split(n, cfg.test_fraction, cfg.split_seed)
    train, test = (DSpritesImages(i, official, classes) for i in (train_idx, test_idx))
    return train, test, f"{source}, split: seeded {cfg.test_fraction:g} fraction"
