"""How many images a data set trains on and how many classes it has, read from what the set says of itself (file
headers, a folder listing, a file count) instead of decoding it.

Why: some parts derive config keys from the data (β-TCVAE's data-set size, a conditional model's class count).
The config is complete once resolved, so ``--dry-run`` prints and config.yaml records the values training uses;
counting must therefore be cheap and must not touch the disk. Each count equals what loading the set gives
(``len`` of its training split; ``class_count``'s max label + 1); the tests hold them to that. A set that
declares no counting function is counted by loading it (``DataSet.count``).

Where the data contradict the config (a class with no training image, images outside any class folder) the
counts do not say so: loading refuses such a set in one line, as it always has.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from utils.data.idx import IDX_FILES, read_idx

if TYPE_CHECKING:
    from utils.data.config import DataConfig

# torchvision's sets whose files hold no count in a header we read: (training images, classes) of the official files
TORCHVISION_COUNTS = {"MNIST": (60_000, 10), "FashionMNIST": (60_000, 10), "CIFAR10": (50_000, 10)}


@dataclass(frozen=True)
class Counts:
    """A data set's training-split size and its number of classes (None: a set without labels)."""

    train: int
    classes: int | None


def torchvision_counts(cls_name: str, cfg: DataConfig) -> Counts:
    """MNIST and Fashion-MNIST from their IDX label files (the count in the header, the labels themselves: 70 kB);
    the official figures when the files are not there yet (a download brings the official files) or for CIFAR-10."""
    n, classes = TORCHVISION_COUNTS[cls_name]
    raw = Path(cfg.root) / cls_name / "raw"
    try:
        train, test = (read_idx(raw / labels) for _, labels in IDX_FILES)
        if train is None or test is None or train.ndim != 1 or test.ndim != 1:
            raise ValueError("not IDX label files")
        return Counts(len(train), max(int(train.max()), int(test.max())) + 1)
    except (OSError, ValueError):  # absent (to download) or damaged: loading fetches or refuses it
        return Counts(n, classes)


def dsprites_counts(cfg: DataConfig) -> Counts:
    """dSprites: the official file's image count from its ``imgs`` header when it is under data.root, else the
    renderer's factor grid; the seeded split's training part; no labels."""
    from utils.data.dsprites import N_IMAGES, OFFICIAL_NAME
    from utils.data.splits import held_out

    n, npz = N_IMAGES, Path(cfg.root) / OFFICIAL_NAME
    if npz.is_file():
        n = _npz_length(npz) or n  # an unreadable file: loading refuses it
    return Counts(n - held_out(n, cfg.test_fraction), None)


def _npz_length(npz: Path) -> int | None:
    """The first dimension of the ``imgs`` array in an .npz, from its .npy header alone; None when unreadable."""
    import numpy as np

    try:
        with zipfile.ZipFile(npz) as zf, zf.open("imgs.npy") as f:
            major = np.lib.format.read_magic(f)[0]
            header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape = header(f)[0]
    except (zipfile.BadZipFile, KeyError, OSError, ValueError):
        return None
    return shape[0] if shape else None


def image_folder_counts(cfg: DataConfig) -> Counts:
    """A folder of images: the listing that loading splits, and one class per sub-folder holding images."""
    from utils.data.sources import folder_listing
    from utils.data.splits import held_out

    paths, classes = folder_listing(cfg)
    return Counts(len(paths) - held_out(len(paths), cfg.test_fraction),
                  len(classes) if cfg.labels and classes else None)


def loaded_counts(train_labels, test_labels, train_size: int) -> Counts:
    """Counts of loaded splits, as ``class_count`` reads their labels: max + 1 when both splits have labels."""
    if train_labels is None or test_labels is None:
        return Counts(train_size, None)
    return Counts(train_size, max(int(train_labels.max()), int(test_labels.max())) + 1)

