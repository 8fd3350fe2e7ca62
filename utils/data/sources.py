"""Loaders of the data sets on disk: torchvision's (MNIST, Fashion-MNIST, CIFAR-10), CelebA and image
folders. Each takes the ``data`` section and the images' shape and returns (train, test, source)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from utils.data.idx import IDX_FILES, damaged_idx_files, read_idx
from utils.data.splits import IMAGE_EXTS, FileImages, ImageSplit, TensorImages, seeded_split
from utils.errors import UserError

if TYPE_CHECKING:
    from utils.data.config import DataConfig

# CelebA's official partition by file number: train 1-162,770, valid 162,771-182,637, test 182,638-202,599
CELEBA_VALID_FIRST, CELEBA_TEST_FIRST = 162_771, 182_638


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


def torchvision_set(cls_name: str, cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[ImageSplit, ImageSplit, str]:
    """The official train and test splits of a torchvision set, decoded once into uint8 tensors."""
    import torchvision

    root = Path(cfg.root)
    where = root / ("cifar-10-batches-py" if cls_name == "CIFAR10" else f"{cls_name}/raw")
    fix = f"put the official files in {where}, or point data.root at a folder that holds them"
    splits = []
    for train in (True, False):
        try:
            ds = getattr(torchvision.datasets, cls_name)(root=str(root), train=train, download=cfg.download)
        except (RuntimeError, OSError, ValueError, AssertionError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            damaged = damaged_idx_files(where)
            if damaged:
                raise UserError(f"{damaged[0]} is damaged ({damaged[1]}): delete it and rerun with data.download=true "
                                f"to fetch it again, or restore the official file") from None
            if where.is_dir() and any(where.iterdir()) and "corrupt" in first.lower():  # files there, not whole
                raise UserError(f"the {cls_name} files in {where} are incomplete or damaged ({first.rstrip('.')}): "
                                f"delete the folder and rerun with data.download=true, or restore the official "
                                f"files") from None
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


def idx_set(cls_name: str, cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[ImageSplit, ImageSplit, str]:
    """MNIST and Fashion-MNIST: the official IDX files read as torchvision's class reads them, when all four are
    in data.root/<set>/raw and whole, without importing torchvision (whose import, with the models and the
    compiler it loads, takes longer than the read); otherwise torchvision's class, which downloads them or says
    what is wrong. A test holds the two readings equal."""
    raw = Path(cfg.root) / cls_name / "raw"
    if not all((raw / name).is_file() for pair in IDX_FILES for name in pair) or damaged_idx_files(raw):
        return torchvision_set(cls_name, cfg, shape)
    splits = []
    for images_file, labels_file in IDX_FILES:
        images, labels = read_idx(raw / images_file), read_idx(raw / labels_file)
        if images is None or labels is None or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            return torchvision_set(cls_name, cfg, shape)  # not the official layout: torchvision says so
        splits.append(TensorImages(_resize(torch.from_numpy(images).unsqueeze(1), shape[1]),
                                   torch.from_numpy(labels).long()))
    return splits[0], splits[1], cfg.root


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def celeba(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[ImageSplit, ImageSplit, str]:
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
    paths = list_images(folder)
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
        train_idx, test_idx = seeded_split(len(paths), cfg.test_fraction, cfg.split_seed)
        how = (f"seeded {cfg.test_fraction:g} fraction"
               + (" (no image in the official test range)" if split is not None else ""))
    else:
        train_idx, test_idx = (split == 0).nonzero().flatten(), (split == 2).nonzero().flatten()
    train = FileImages([paths[i] for i in train_idx], None, shape, face_crop=True)
    test = FileImages([paths[i] for i in test_idx], None, shape, face_crop=True)
    return train, test, f"{folder}, split: {how}"


def _celeba_torchvision(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[ImageSplit, ImageSplit, str] | None:
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


def folder_listing(cfg: DataConfig) -> tuple[list[Path], list[str]]:
    """(the images under data.root, the names of its sub-folders that hold images): what an image folder's loading
    and its counts both read."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root} is not a folder: point it at a folder of images (jpg, png, webp)")
    paths = list_images(root)
    if not paths:
        raise UserError(f"no images (jpg, png, webp) under {root}: point data.root at a folder that has some")
    return paths, sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})


def image_folder(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[ImageSplit, ImageSplit, str]:
    root = Path(cfg.root)
    paths, classes = folder_listing(cfg)
    labels = None
    if cfg.labels and classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index.get(p.relative_to(root).parts[0], -1) for p in paths])
    train_idx, test_idx = seeded_split(len(paths), cfg.test_fraction, cfg.split_seed)

    def part(idx: torch.Tensor) -> FileImages:
        return FileImages([paths[i] for i in idx], None if labels is None else labels[idx], shape)

    what = f"{root}" + (f", labels from {len(classes)} sub-folders" if labels is not None else "")
    return part(train_idx), part(test_idx), f"{what}, split: seeded {cfg.test_fraction:g} fraction"
