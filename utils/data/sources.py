"""Data sets, registered by their YAML name (``data.name``) in ``DATASETS``.

Each split is an ``Images`` source that returns uint8 batches for a tensor of
indices. Why three kinds of source:
- ``TensorImages``: sets that fit in memory (MNIST, Fashion-MNIST, CIFAR-10) or a
  decoded cache on disk (memory-mapped) — decoded once, batched by slicing, on
  the GPU when there is one. No per-item Python, no PIL.
- ``FileImages``: JPEG/PNG folders (CelebA, image_folder) — decoded with Pillow in
  DataLoader workers; ``data.cache: true`` decodes and resizes once into a uint8
  .npy so later epochs read no JPEG.
- ``DSpritesImages``: rendered per batch from the factor indices (utils/dsprites.py).

The order in which training visits them is in utils/batching.py.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from utils.data import dsprites
from utils.errors import UserError

if TYPE_CHECKING:
    from utils.data.config import DataConfig

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# CelebA's official partition by file number: train 1-162,770, valid 162,771-182,637, test 182,638-202,599
CELEBA_VALID_FIRST, CELEBA_TEST_FIRST = 162_771, 182_638


def image_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of a data set's images after loading, known without reading the data."""
    channels, size = DATASETS[cfg.name].channels, DATASETS[cfg.name].size
    if cfg.name == "dsprites" and cfg.img_size not in (0, 64):
        raise UserError(f"dSprites images are 64x64, not data.img_size={cfg.img_size}: set data.img_size=64 or 0")
    if cfg.channels:
        if cfg.name not in ("image_folder", "hf") and cfg.channels != channels:
            kind = "greyscale (1 channel)" if channels == 1 else "RGB (3 channels)"
            raise UserError(f"{cfg.name} is {kind} but data.channels={cfg.channels}: "
                            f"set data.channels={channels} or leave it at 0 (the set's own)")
        channels = cfg.channels
    return channels, cfg.img_size or size, cfg.img_size or size


class Images:
    """A split of a data set: ``get(idx)`` -> uint8 (N, C, H, W)."""

    labels: torch.Tensor | None  # (N,) class labels, or None
    shape: tuple[int, int, int]
    workers_needed = False  # True: decode in DataLoader workers
    reading = "in memory"   # how batches are made, for the start-up summary

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Images at ``idx`` as float in [0, 1]."""
        return self.get(idx).float().div_(255.0)

    def labels_at(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Class labels (N,) of the images at ``idx``, on its device; None for a set without labels."""
        if self.labels is None:
            return None
        return self.labels[idx.to(self.labels.device)].to(idx.device)

    def to(self, device: torch.device | str) -> Images:
        return self


@dataclass
class TensorImages(Images):
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


@dataclass
class DSpritesImages(Images):
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
        return dsprites.render(flat.to(idx.device))

    def factors(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes (N, 5), values (N, 5)) of the ground-truth factors, for evaluation code."""
        flat = self.indices[idx.cpu()]
        if self.official_classes is not None:
            classes = torch.from_numpy(self.official_classes[flat.numpy(), 1:]).long()
        else:
            classes = dsprites.index_to_classes(flat)
        values = torch.stack([v[classes[:, k]] for k, v in enumerate(dsprites.factor_values())], 1)
        return classes, values


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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            side = crop_box(w, h, face_crop)[2]
            img.draft("RGB" if channels == 3 else "L", (math.ceil(size * w / side), math.ceil(size * h / side)))
            return fit(img, size, channels, face_crop)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"image {path} has vanished (data.root moved or unmounted?): restore it and rerun; "
                            f"a training run continues with -r latest") from None
        raise UserError(f"cannot read image {path} ({str(e).splitlines()[0]}): remove or replace the file") from None


def fit(img, size: int, channels: int, face_crop: bool) -> torch.Tensor:
    """A PIL image -> uint8 (C, size, size): grey or RGB, the square crop, an antialiased bicubic resize."""
    from PIL import Image

    img = img.convert("RGB" if channels == 3 else "L")
    left, top, side = crop_box(*img.size, face_crop)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.reshape(size, size, channels).copy()).permute(2, 0, 1)


class DecodedImages(Images, torch.utils.data.Dataset):
    """Images decoded one by one (``__getitem__``) in DataLoader workers; ``cache_key`` names their content and
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
        if not target.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # machines sharing the folder: each its own
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
        return "\n".join(map(str, self.paths)).encode() + repr((self.shape, self.face_crop)).encode()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _root_problem(root: Path) -> str | None:
    """Why torchvision cannot write a download under ``root``, or None when it can."""
    for p in (root, *root.parents):
        if p.is_symlink() and not p.exists():
            return f"{p} is a symbolic link to {os.readlink(p)}, which does not exist"
        if p.exists():
            if not p.is_dir():
                return f"{p} is a file, not a folder"
            if not os.access(p, os.W_OK | os.X_OK):
                return f"{p} is not writable"
            return None
    return None


def _torchvision(cls_name: str, cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[Images, Images, str]:
    """The official train and test splits of a torchvision set, decoded once into uint8 tensors."""
    import torchvision

    root = Path(cfg.root)
    where = root / ("cifar-10-batches-py" if cls_name == "CIFAR10" else f"{cls_name}/raw")
    fix = f"put the official files in {where}, or point data.root at a folder that holds them"
    splits = []
    for train in (True, False):
        try:
            ds = getattr(torchvision.datasets, cls_name)(root=str(root), train=train, download=cfg.download)
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            if not cfg.download:  # torchvision: "Dataset not found or corrupted"
                raise UserError(f"{cls_name} not found in {where}: {fix}, or set data.download=true "
                                f"(needs internet) [{first}]") from None
            problem = _root_problem(root)
            if problem is None and isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                problem = f"{e.filename or root} is not writable"
            if problem is not None:
                raise UserError(f"{cls_name} could not be downloaded into data.root={cfg.root}: {problem}; "
                                f"fix it, or {fix}") from None
            raise UserError(f"{cls_name} could not be downloaded (no network? {first.rstrip(':')}): {fix}") from None
        data = torch.as_tensor(np.asarray(ds.data))
        images = data.permute(0, 3, 1, 2).contiguous() if data.ndim == 4 else data.unsqueeze(1)  # (N, C, H, W)
        labels = torch.as_tensor(np.asarray(ds.targets)).long()
        splits.append(TensorImages(_resize(images, shape[1]), labels))
    return splits[0], splits[1], cfg.root


def cpu_workers(requested: int) -> int:
    """DataLoader workers: as configured, but never more than the CPUs this process may use."""
    return min(requested, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _seeded_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) index tensors: a fixed random ``fraction`` of n held out (at least one)."""
    if n < 2:
        raise UserError(f"only {n} image found: a data set needs at least 2 (one to train on, one held out)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * fraction))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _celeba(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[Images, Images, str]:
    root = Path(cfg.root)
    candidates = [root / "celeba", root, root.parent]
    folder = next((c / "img_align_celeba" for c in candidates if (c / "img_align_celeba").is_dir()), None)
    if folder is None and root.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir()):
        folder = root
    if folder is None:
        raise UserError(f"CelebA images not found under {root}: unzip img_align_celeba.zip to "
                        f"{root / 'celeba' / 'img_align_celeba'}/ (with list_eval_partition.txt in {root / 'celeba'}/ "
                        f"for the official splits); torchvision's download often fails on Google Drive's quota, "
                        f"so fetch it by hand from the CelebA site or a mirror")
    tv = _celeba_torchvision(cfg, shape)
    if tv is not None:
        return tv
    paths = _list_images(folder)
    if not paths:
        raise UserError(f"no images (jpg, png, webp) in {folder}: unzip the aligned CelebA images there")
    partition = next((p for p in (folder.parent / "list_eval_partition.txt", root / "list_eval_partition.txt")
                      if p.is_file()), None)
    split = None  # 0 train, 1 valid (unused), 2 test, per image
    if partition is not None:
        part = dict(line.split()[:2] for line in partition.read_text().splitlines() if line.strip())
        split = torch.tensor([int(part.get(p.name, "0")) for p in paths])
        how = f"official partition ({partition.name})"
    elif all(re.fullmatch(r"\d{6}\.jpg", p.name) for p in paths):
        num = torch.tensor([int(p.stem) for p in paths])
        split = (num >= CELEBA_VALID_FIRST).long() + (num >= CELEBA_TEST_FIRST).long()
        how = "official index ranges"
    if split is None or not (split == 2).any() or not (split == 0).any():
        train_idx, test_idx = _seeded_split(len(paths), cfg.test_fraction, cfg.split_seed)
        how = (f"seeded {cfg.test_fraction:g} fraction"
               + (" (no image in the official test range)" if split is not None else ""))
    else:
        train_idx, test_idx = (split == 0).nonzero().flatten(), (split == 2).nonzero().flatten()
    train = FileImages([paths[i] for i in train_idx], None, shape, face_crop=True)
    test = FileImages([paths[i] for i in test_idx], None, shape, face_crop=True)
    return train, test, f"{folder}, split: {how}"


def _celeba_torchvision(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[Images, Images, str] | None:
    """The official layout through torchvision's CelebA (official splits), or None when it is not complete."""
    import torchvision

    base = Path(cfg.root) / "celeba"
    if not (base / "img_align_celeba").is_dir() or not (base / "list_eval_partition.txt").is_file():
        return None
    try:
        splits = [torchvision.datasets.CelebA(cfg.root, split=s, target_type=[], download=False)
                  for s in ("train", "test")]
    except RuntimeError:  # annotation files missing or not the official ones: use the folder + partition file
        return None
    train, test = (FileImages([base / "img_align_celeba" / f for f in ds.filename], None, shape, face_crop=True)
                   for ds in splits)
    return train, test, f"{base} (torchvision CelebA), split: official partition"


def _image_folder(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[Images, Images, str]:
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root} is not a folder: point it at a folder of images (jpg, png, webp)")
    paths = _list_images(root)
    if not paths:
        raise UserError(f"no images (jpg, png, webp) under {root}: point data.root at a folder that has some")
    labels = None
    classes = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
    if cfg.labels and classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index.get(p.relative_to(root).parts[0], -1) for p in paths])
    train_idx, test_idx = _seeded_split(len(paths), cfg.test_fraction, cfg.split_seed)

    def part(idx: torch.Tensor) -> FileImages:
        return FileImages([paths[i] for i in idx], None if labels is None else labels[idx], shape)

    what = f"{root}" + (f", labels from {len(classes)} sub-folders" if labels is not None else "")
    return part(train_idx), part(test_idx), f"{what}, split: seeded {cfg.test_fraction:g} fraction"


def _dsprites(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[Images, Images, str]:
    npz = Path(cfg.root) / dsprites.OFFICIAL_NAME
    official, classes, n, source = None, None, dsprites.N_IMAGES, "procedural renderer"
    if npz.is_file():
        imgs, classes = dsprites.official_images(npz, Path(cfg.cache_dir))
        official, n, source = torch.from_numpy(imgs), len(imgs), str(npz)
    train_idx, test_idx = _seeded_split(n, cfg.test_fraction, cfg.split_seed)
    train, test = (DSpritesImages(i, official, classes) for i in (train_idx, test_idx))
    return train, test, f"{source}, split: seeded {cfg.test_fraction:g} fraction"


def _hf(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[Images, Images, str]:
    from utils.data.hf import load_hf  # (it builds on this module)

    return load_hf(cfg, shape)


@dataclass(frozen=True)
class DataSet:
    """A registered data set: its channels and native size, and its loader (config, shape) -> (train, test, source)."""

    channels: int
    size: int
    load: Callable[[DataConfig, tuple[int, int, int]], tuple[Images, Images, str]]


DATASETS: dict[str, DataSet] = {
    "mnist": DataSet(1, 28, partial(_torchvision, "MNIST")),
    "fashion_mnist": DataSet(1, 28, partial(_torchvision, "FashionMNIST")),
    "cifar10": DataSet(3, 32, partial(_torchvision, "CIFAR10")),
    "celeba": DataSet(3, 64, _celeba),
    "dsprites": DataSet(1, 64, _dsprites),
    "image_folder": DataSet(3, 64, _image_folder),  # channels and size as configured
    "hf": DataSet(3, 64, _hf),  # Hugging Face datasets (utils/hf_data.py); channels and size as configured
}


def load_data(cfg: DataConfig, num_workers: int = 0) -> tuple[Images, Images, str]:
    """(train, test, one-line summary) for ``cfg.name``."""
    train, test, source = DATASETS[cfg.name].load(cfg, image_shape(cfg))
    if cfg.cache:
        train, test = (s.cached(Path(cfg.cache_dir), num_workers) if isinstance(s, DecodedImages) else s
                       for s in (train, test))
    c, h, w = train.shape
    summary = f"data: {cfg.name} train={len(train)} test={len(test)} shape={c}x{h}x{w} ({train.reading}) from {source}"
    return train, test, summary


def class_count(train: Images, test: Images) -> int:
    """The number of classes of a labelled data set, for a conditional VAE; a one-line error when it has none."""
    labels = [s.labels for s in (train, test) if s.labels is not None]
    if len(labels) < 2:
        raise UserError("model.conditional=true needs class labels, and this data set has none: use mnist, "
                        "fashion_mnist, cifar10 or an image_folder with one sub-folder per class")
    if min(int(y.min()) for y in labels) < 0:
        raise UserError("some images lie directly in data.root, outside any class sub-folder: move them into one, "
                        "or set model.conditional=false")
    return max(int(y.max()) for y in labels) + 1
