"""The data sets, registered by their YAML name (``data.name``) in ``DATASETS``, and loading one.

A registered set states what the rest of the toolkit needs to know of it, so no code outside
this module tests its name: its channels and native size, whether ``data.channels`` may convert
it (``any_channels``), whether ``data.img_size`` may resize it (``fixed_size``), whether its images
come with ground-truth factors (``has_factors``: its splits then carry them as ``factors``, a
``utils.data.factors.Factors``), its loader, and how it counts its training images and classes
without loading (``counts``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from utils.data.counts import Counts, dsprites_counts, image_folder_counts, loaded_counts, torchvision_counts
from utils.errors import UserError
from utils.fields import Deferred

if TYPE_CHECKING:
    from utils.data.config import DataConfig
    from utils.data.splits import ImageSplit


@dataclass(frozen=True)
class DataSet:
    """A registered data set: its channels and native size, and its loader (config, shape) -> (train, test,
    source), by reference (``Deferred``: the loaders' modules import torch, and a config names its set before
    torch loads). ``any_channels``: converted to ``data.channels`` when set; ``fixed_size``: only its native size;
    ``has_factors``: its splits carry ground-truth generative factors (``ImageSplit.factors``: the
    disentanglement scores need them; known here before any data is read)."""

    channels: int
    size: int
    load: Callable[[DataConfig, tuple[int, int, int]], tuple[ImageSplit, ImageSplit, str]]
    any_channels: bool = False
    fixed_size: bool = False
    has_factors: bool = False
    counts: Callable[[DataConfig], Counts] | None = None  # cheap counts (utils/data/counts.py); None: by loading

    def count(self, cfg: DataConfig) -> Counts:
        """The training-split size and class count that loading ``cfg`` gives, as cheaply as the set allows."""
        if self.counts is not None:
            return self.counts(cfg)
        train, test, _ = self.load(cfg, image_shape(cfg))
        return loaded_counts(train.labels, test.labels, len(train))


DATASETS: dict[str, DataSet] = {
    "mnist": DataSet(1, 28, Deferred("utils.data.sources:idx_set", "MNIST"),
                     counts=partial(torchvision_counts, "MNIST")),
    "fashion_mnist": DataSet(1, 28, Deferred("utils.data.sources:idx_set", "FashionMNIST"),
                             counts=partial(torchvision_counts, "FashionMNIST")),
    "cifar10": DataSet(3, 32, Deferred("utils.data.sources:torchvision_set", "CIFAR10"),
                       counts=partial(torchvision_counts, "CIFAR10")),
    "celeba": DataSet(3, 64, Deferred("utils.data.sources:celeba")),
    "dsprites": DataSet(1, 64, Deferred("utils.data.dsprites:load_dsprites"), fixed_size=True, has_factors=True,
                        counts=dsprites_counts),
    # channels and size as configured
    "image_folder": DataSet(3, 64, Deferred("utils.data.sources:image_folder"), any_channels=True,
                            counts=image_folder_counts),
    # Hugging Face datasets; channels and size as configured
    "hf": DataSet(3, 64, Deferred("utils.data.hf:load_hf"), any_channels=True),
}


def image_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of a data set's images after loading, known without reading the data."""
    ds = DATASETS[cfg.name]
    channels, size = ds.channels, ds.size
    if ds.fixed_size and cfg.img_size not in (0, size):
        raise UserError(f"{cfg.name} images are {size}x{size}, not data.img_size={cfg.img_size}: set "
                        f"data.img_size={size} or 0")
    if cfg.channels:
        if not ds.any_channels and cfg.channels != channels:
            kind = "greyscale (1 channel)" if channels == 1 else "RGB (3 channels)"
            raise UserError(f"{cfg.name} is {kind} but data.channels={cfg.channels}: "
                            f"set data.channels={channels} or leave it at 0 (the set's own)")
        channels = cfg.channels
    return channels, cfg.img_size or size, cfg.img_size or size


def load_data(cfg: DataConfig, num_workers: int = 0) -> tuple[ImageSplit, ImageSplit, str]:
    """(train, test, one-line summary) for ``cfg.name``."""
    from utils.data.splits import DecodedImages

    ds = DATASETS[cfg.name]
    train, test, source = ds.load(cfg, image_shape(cfg))
    if ds.has_factors != (test.factors is not None):
        raise TypeError(f"data set {cfg.name}: has_factors={ds.has_factors}, but its loader's splits "
                        f"{'carry no' if ds.has_factors else 'carry'} factors")
    if cfg.cache:
        train, test = (s.cached(Path(cfg.cache_dir), num_workers) if isinstance(s, DecodedImages) else s
                       for s in (train, test))
    c, h, w = train.shape
    summary = f"data: {cfg.name} train={len(train)} test={len(test)} shape={c}x{h}x{w} ({train.reading}) from {source}"
    return train, test, summary


def class_count(train: ImageSplit, test: ImageSplit, n_classes: int = 0) -> int:
    """The number of classes of a labelled data set, for a conditional VAE (``n_classes``: the config's, 0 for
    from the data); a one-line error when it has none, or when a class would train on no image: a set of one
    class (a one-class model is an unconditional one), a label with no training image, or an ``n_classes``
    other than the labels'."""
    labels = [s.labels for s in (train, test) if s.labels is not None]
    if len(labels) < 2:
        raise UserError("model.conditional=true needs class labels, and this data set has none: use mnist, "
                        "fashion_mnist, cifar10 or an image_folder with one sub-folder per class")
    if min(int(y.min()) for y in labels) < 0:
        raise UserError("some images lie directly in data.root, outside any class sub-folder: move them into one, "
                        "or set model.conditional=false")
    classes = max(int(y.max()) for y in labels) + 1
    trained = set(train.labels.unique().tolist())
    if len(trained) < 2:
        raise UserError(f"model.conditional=true needs at least 2 classes, and the training images all have "
                        f"label {min(trained)}: a model of one class is an unconditional one: set "
                        f"model.conditional=false, or add images of other classes (an image_folder: one "
                        f"sub-folder per class)")
    if n_classes and n_classes != classes:
        raise UserError(f"model.n_classes={n_classes} but the data set's labels are 0..{classes - 1} ({classes} "
                        f"classes): set model.n_classes={classes}, or 0 to take it from the data")
    missing = sorted(set(range(classes)) - trained)
    if missing:
        raise UserError(f"class{'es' * (len(missing) > 1)} {', '.join(map(str, missing[:8]))} of 0..{classes - 1} "
                        f"{'have' if len(missing) > 1 else 'has'} no training image, so the model could not learn "
                        f"{'them' if len(missing) > 1 else 'it'}: give every class training images (an "
                        f"image_folder: more images in its sub-folder), or set model.conditional=false")
    return classes
