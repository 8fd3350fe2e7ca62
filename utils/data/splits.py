"""A split of a data set (``ImageSplit``) and the kinds of split, by how their images are read:

- ``TensorImages``: sets that fit in memory (MNIST, Fashion-MNIST, CIFAR-10) or a
  decoded cache on disk (memory-mapped) — decoded once, batched by slicing, on
  the GPU when there is one. No per-item Python, no PIL.
- ``FileImages``: JPEG/PNG folders (CelebA, image_folder) — decoded with Pillow in
  DataLoader workers; ``data.cache: true`` decodes and resizes once into a uint8
  .npy so later epochs read no JPEG.
- ``DSpritesImages`` (utils/data/dsprites.py) and ``HFImages`` (utils/data/hf.py).

The order in which training visits them is in utils/data/batching.py.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.errors import UserError
from utils.files import private_temporary, remove_stale_temporaries

if TYPE_CHECKING:
    from utils.data.factors import Factors

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# part of every decoded cache's name: a change in how files decode (16-bit images scaled, not clipped) must not
# reuse caches that the old decoding wrote
DECODING = b"decoding 2: high bit depths scaled"


class ImageSplit:
    """A split of a data set: ``get(idx)`` -> uint8 (N, C, H, W). ``factors``: the set's ground-truth factors
    (utils/data/factors.py), None for a set without them."""

    labels: torch.Tensor | None  # (N,) class labels, or None
    factors: Factors | None = None
    shape: tuple[int, int, int]
    workers_needed = False  # True: decode in DataLoader workers
    reading = "in memory"   # how batches are made, for the start-up summary

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """ImageSplit at ``idx`` as float in [0, 1]."""
        return self.get(idx).float().div_(255.0)

    def labels_at(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Class labels (N,) of the images at ``idx``, on its device; None for a set without labels."""
        if self.labels is None:
            return None
        return self.labels[idx.to(self.labels.device)].to(idx.device)

    def to(self, device: torch.device | str) -> ImageSplit:
        return self


@dataclass
class TensorImages(ImageSplit):
    images: torch.Tensor          # (N, C, H, W) uint8, in memory or memory-mapped
    labels: torch.Tensor | None   # (N,) int64, or None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        if self.images.device.type == "cpu" and idx.device.type != "cpu":
            return self.images[idx.cpu()].to(idx.device)
        return self.images[idx.to(self.images.device)]

    def to(self, device: torch.device | str) -> TensorImages:
        labels = None if self.labels is None else self.labels.to(device)
        return TensorImages(self.images.to(device), labels)


def crop_box(w: int, h: int, face_crop: bool) -> tuple[int, int, int]:
    """(left, top, side) of the square crop: CelebA's centred 140 px face of 178x218, scaled; else the centre."""
    side = round(140 * w / 178) if face_crop else min(w, h)
    side = min(side, w, h)
    return (w - side) // 2, (h - side) // 2, side


def decode(path: Path, size: int, channels: int, face_crop: bool) -> torch.Tensor:
    """One image file -> uint8 (C, size, size): decode, square crop, antialiased resize.

    Pillow (torchvision's own decoders are deprecated); JPEGs are decoded at the
    smallest DCT scale that still covers the crop (``draft``), which makes large
    files several times cheaper.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            side = crop_box(w, h, face_crop)[2]
            img.draft("RGB" if channels == 3 else "L", (math.ceil(size * w / side), math.ceil(size * h / side)))
            return crop_resize(img, size, channels, face_crop)
    except FileNotFoundError:
        raise UserError(f"image {path} has vanished (data.root moved or unmounted?): restore it and rerun; "
                        f"a training run continues with -r latest") from None
    except unreadable_errors() as e:
        raise UserError(f"cannot read image {path} ({unreadable_why(e)}): remove or replace the file") from None


def unreadable_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot read: not an image, too many pixels (a decompression bomb),
    truncated, a damaged header."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError,
            struct.error)


def unreadable_why(e: BaseException) -> str:
    """The first line of Pillow's reason, for a ``cannot read image`` line."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else e.__class__.__name__


def full_scale(img) -> float | None:
    """The value that means full intensity in a Pillow image with more than 8 bits a channel, or None for an 8-bit
    one. Pillow's ``convert("L")`` clips such values at 255 (a 16-bit PNG turns white), so they are scaled instead.
    16-bit grey opens as I;16 (or I, from a PNG, in older Pillows); 32-bit integer as I, whose TIFF tags give its
    depth and sign; float (F) is taken as [0, 1]. Pillow already reads 16-bit RGB(A) PNGs as 8-bit RGB(A) (their
    high bytes)."""
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode == "F":
        return 1.0
    if img.mode != "I":
        return None
    if img.format == "PNG":  # PNG has no 32-bit grey: I is its 16-bit grey
        return 65535.0
    tags = getattr(img, "tag_v2", {})  # TIFF: BitsPerSample (258), SampleFormat (339; 2 = signed)
    bits, sample_format = (v[0] if isinstance(v, tuple) else v for v in (tags.get(258, 32), tags.get(339, 2)))
    return float(2 ** (int(bits) - 1) - 1 if sample_format == 2 else 2 ** int(bits) - 1)


def crop_resize(img, size: int, channels: int, face_crop: bool) -> torch.Tensor:
    """A PIL image -> uint8 (C, size, size): grey or RGB, the square crop, an antialiased bicubic resize. An image of
    more than 8 bits a channel is first scaled by its depth to 8 bits (value * 255 / full scale, rounded)."""
    from PIL import Image

    full = full_scale(img)
    if full is not None:
        unit = np.clip(np.asarray(img, dtype=np.float64) / full, 0.0, 1.0)
        img = Image.fromarray(np.rint(unit * 255).astype(np.uint8), "L")
    img = img.convert("RGB" if channels == 3 else "L")
    left, top, side = crop_box(*img.size, face_crop)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.reshape(size, size, channels).copy()).permute(2, 0, 1)


class DecodedImages(ImageSplit, torch.utils.data.Dataset):
    """ImageSplit decoded one by one (``__getitem__``) in DataLoader workers; ``cache_key`` names their content and
    decoded shape."""

    workers_needed = True
    reading = "decoded per batch by DataLoader workers"

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([self[i] for i in idx.tolist()]).to(idx.device)

    def cache_key(self) -> bytes:
        raise NotImplementedError

    def cached(self, cache_dir: Path, num_workers: int) -> TensorImages:
        """Decode every image once into a uint8 .npy (memory-mapped after); reused while the content key is the
        same."""
        key = hashlib.sha1(self.cache_key())
        target = cache_dir / f"images-{len(self)}-{'x'.join(map(str, self.shape))}-{key.hexdigest()[:12]}.npy"
        remove_stale_temporaries(cache_dir)  # builds killed half-way
        images = read_cache(target, (len(self), *self.shape))
        if images is None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = private_temporary(target)
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(self), *self.shape))
            loader = torch.utils.data.DataLoader(self, batch_size=256, num_workers=cpu_workers(num_workers))
            start = 0
            for batch in loader:
                arr[start:start + len(batch)] = batch.numpy()
                start += len(batch)
            arr.flush()
            del arr
            tmp.replace(target)
            images = torch.from_numpy(np.load(target, mmap_mode="c"))
        return TensorImages(images, self.labels)


def read_cache(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A decoded cache, memory-mapped (copy-on-write: the file never changes), or None when there is none or it is
    damaged (truncated, not a .npy, another shape): a damaged one is deleted, to be rebuilt, with a warning."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="c")
        if arr.shape != shape or arr.dtype != np.uint8:
            raise ValueError(f"shape {arr.shape} {arr.dtype}, expected {shape} uint8")
    except (ValueError, OSError, EOFError) as e:
        print(f"warning: the cache {path} is damaged ({str(e).splitlines()[0][:120]}): rebuilding it",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
    return torch.from_numpy(arr)


@dataclass
class FileImages(DecodedImages):
    paths: list[Path]
    labels: torch.Tensor | None
    shape: tuple[int, int, int]
    face_crop: bool = False

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode(self.paths[i], self.shape[1], self.shape[0], self.face_crop)

    def cache_key(self) -> bytes:
        return "\n".join(map(str, self.paths)).encode() + repr((self.shape, self.face_crop)).encode() + DECODING


def cpu_workers(requested: int) -> int:
    """DataLoader workers: as configured, but never more than the CPUs this process may use."""
    return min(requested, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def held_out(n: int, fraction: float) -> int:
    """Images a seeded split of ``n`` holds out: ``fraction`` of them, rounded, at least one (also what
    utils/data/counts.py counts without loading)."""
    return max(1, round(n * fraction))


def seeded_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) index tensors: a fixed random ``fraction`` of n held out (at least one)."""
    if n < 2:
        raise UserError(f"only {n} image found: a data set needs at least 2 (one to train on, one held out)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = held_out(n, fraction)
    return perm[n_test:].sort().values, perm[:n_test].sort().values
