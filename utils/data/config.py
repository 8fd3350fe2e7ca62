"""The ``data`` config section: which data set, where, at what size, and how it is read."""

from __future__ import annotations

from dataclasses import dataclass

from utils.fields import opt


@dataclass
class DataConfig:
    name: str = opt("mnist", "data set")
    root: str = opt("data", "folder holding the data set (see docs/data.md)")
    download: bool = opt(True, "download MNIST / Fashion-MNIST / CIFAR-10 when missing (needs internet)")
    img_size: int = opt(0, "image size after loading; 0: the set's own (28 MNIST, 32 CIFAR-10, 64 others)",
                        min=0, max=512)
    channels: int = opt(0, "0: the set's own; image_folder and hf convert to 1 (grey) or 3 (RGB)", choices=(0, 1, 3))
    hflip: bool = opt(False, "random horizontal flips of training batches (CelebA, CIFAR-10)")
    cache: bool = opt(False, "image files: decode and resize once into data.cache_dir; later epochs read no file")
    cache_dir: str = opt("cache", "where decoded caches (and dSprites' extracted array) are written")
    num_workers: int = opt(4, "DataLoader workers decoding image files (0: in the main process)", min=0)
    test_fraction: float = opt(0.05, "held-out fraction for sets without an official test split", min=0.0,
                               max=0.5, min_exclusive=True)
    split_seed: int = opt(0, "seed of that held-out split (fixed: evaluation always sees the same images)", min=0)
    labels: bool = opt(True, "image_folder: class labels from sub-folder names")
    binarize: bool = opt(False, "train on stochastically binarised images (binarised MNIST, with bernoulli)")
    hf_image_column: str = opt("image", "hf: the column holding the images")
    hf_label_column: str = opt("label", "hf: class labels from this column when it exists ('' for none)")
    hf_train_split: str = opt("train", "hf: the split to train on")
    hf_test_split: str = opt("test", "hf: the held-out split ('' or a set without a test split: a seeded "
                                     "data.test_fraction of the training split is held out)")
