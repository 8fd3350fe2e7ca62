"""Hugging Face ``datasets`` as a data source (``data.name: hf``).

``data.root`` names the source, read by the ``datasets`` library:
- a folder written by ``save_to_disk`` (a ``DatasetDict`` or one ``Dataset``),
- a ``.parquet`` file or a folder of them (split names from the file names: train-*.parquet, test-*.parquet),
- a folder of images (``imagefolder``: labels from sub-folder names, splits from train/ and test/ folders),
- otherwise a Hub name (``user/name``), downloaded once into the library's cache (needs network).

Why it scales: Arrow files are memory-mapped, and images are decoded row by row in
DataLoader workers, so a set larger than memory trains with random access, in the
same data order and with the same exact resume as the built-in sets. Streaming
(``IterableDataset``) is not offered: it has no random access, so neither the data
order as a function of the step nor an exact resume could hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.data.config import DataConfig
from utils.data.splits import (
    DECODING,
    DecodedImages,
    ImageSplit,
    crop_resize,
    seeded_split,
    unreadable_errors,
    unreadable_why,
)
from utils.errors import UserError


@dataclass
class HFImages(DecodedImages):
    """One split of a ``datasets.Dataset``: its image column decoded and resized per row."""

    ds: Any                      # datasets.Dataset holding only the image column
    labels: torch.Tensor | None  # (N,) int64, or None
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            row = self.ds[int(i)]  # the library decodes the image here, with Pillow
            return crop_resize(next(iter(row.values())), self.shape[1], self.shape[0], face_crop=False)
        except unreadable_errors() as e:
            raise UserError(f"cannot read image {self.where(int(i))} ({unreadable_why(e)}): remove or replace "
                            f"the file") from None

    def where(self, i: int) -> str:
        """Row ``i``'s file as the data set recorded it (an image folder's path), or the row number."""
        import datasets

        column = self.ds.column_names[0]
        try:
            path = self.ds.cast_column(column, datasets.Image(decode=False))[i][column].get("path")
        except (*unreadable_errors(), KeyError, AttributeError):
            path = None
        return f"{path} (row {i})" if path else f"row {i} of column {column}"

    def cache_key(self) -> bytes:
        return f"hf:{self.ds._fingerprint}:{self.ds.column_names}:{self.shape}".encode() + DECODING


def _open(cfg: DataConfig):
    """The DatasetDict (or Dataset) that ``data.root`` names; a one-line error when the library cannot read it."""
    import datasets

    root = Path(cfg.root)
    cache = str(Path(cfg.cache_dir) / "hf")
    try:
        if root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
            return datasets.load_from_disk(str(root)), f"{root} (save_to_disk)"
        if root.suffix == ".parquet" and root.is_file():
            return datasets.load_dataset("parquet", data_files={"train": str(root)}, cache_dir=cache), f"{root}"
        if root.is_dir() and any(root.rglob("*.parquet")):
            return datasets.load_dataset("parquet", data_dir=str(root), cache_dir=cache), f"{root} (parquet)"
        if root.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache), f"{root} (imagefolder)"
        return datasets.load_dataset(cfg.root, cache_dir=cache), f"{cfg.root} (Hugging Face Hub)"
    except Exception as e:  # the library raises many kinds (missing files, no network, bad formats)
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        where = "is not a folder or file here, and as a Hub name" if not root.exists() else "exists but"
        raise UserError(f"data.root={cfg.root} {where} could not be read by datasets ({e.__class__.__name__}: "
                        f"{first[:200]}): point it at a save_to_disk folder, Parquet files, a folder of images, "
                        f"or a Hub data set (online)") from None


def _split(splits: dict, name: str, key: str) -> Any:
    if name not in splits:
        raise UserError(f"data.{key}={name!r} is not a split of this data set (it has: {', '.join(splits)}): set "
                        f"data.{key} to one of them" + (", or data.hf_test_split='' to hold out a seeded fraction "
                                                        "of the training split" if key == "hf_test_split" else ""))
    return splits[name]


def _labels(ds, column: str) -> torch.Tensor | None:
    if not column or column not in ds.column_names:
        return None
    values = np.asarray(ds.with_format("numpy", columns=[column])[column])
    if not np.issubdtype(values.dtype, np.integer):
        raise UserError(f"data.hf_label_column={column!r} holds {values.dtype} values, not class indices: name an "
                        f"integer (ClassLabel) column, or set data.hf_label_column='' for none")
    return torch.as_tensor(values, dtype=torch.long)


def load_hf(cfg: DataConfig, shape: tuple[int, int, int]) -> tuple[ImageSplit, ImageSplit, str]:
    """(train, test, source) from a ``datasets`` source, checked: splits, the image column, the label column."""
    import datasets

    loaded, source = _open(cfg)
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    train_ds = _split(splits, cfg.hf_train_split, "hf_train_split")
    column = cfg.hf_image_column
    images = ", ".join(c for c, f in train_ds.features.items() if isinstance(f, datasets.Image)) or "none"
    if column not in train_ds.column_names:
        raise UserError(f"data.hf_image_column={column!r} is not a column of this data set (it has: "
                        f"{', '.join(train_ds.column_names)}): set it to an image column ({images})")
    if not isinstance(train_ds.features[column], datasets.Image):
        kind = type(train_ds.features[column]).__name__
        raise UserError(f"data.hf_image_column={column!r} is a {kind} column, not images: set it to an image "
                        f"column ({images})")
    if cfg.hf_label_column and cfg.hf_label_column != "label" and cfg.hf_label_column not in train_ds.column_names:
        raise UserError(f"data.hf_label_column={cfg.hf_label_column!r} is not a column of this data set (it has: "
                        f"{', '.join(train_ds.column_names)}): set it to one of them, or '' for none")

    def part(ds) -> HFImages:
        return HFImages(ds.select_columns([column]), _labels(ds, cfg.hf_label_column), shape)

    # the default test split, absent (a folder or Parquet set with one split): hold out a seeded fraction, as for
    # image folders; a split named on purpose must exist
    no_test = cfg.hf_test_split == DataConfig.hf_test_split and cfg.hf_test_split not in splits
    if cfg.hf_test_split and not no_test:
        train, test = part(train_ds), part(_split(splits, cfg.hf_test_split, "hf_test_split"))
        how = f"splits {cfg.hf_train_split}/{cfg.hf_test_split}"
    else:
        train_idx, test_idx = seeded_split(len(train_ds), cfg.test_fraction, cfg.split_seed)
        train, test = part(train_ds.select(train_idx.tolist())), part(train_ds.select(test_idx.tolist()))
        how = f"seeded {cfg.test_fraction:g} fraction of {cfg.hf_train_split}"
        if no_test:
            how += f" (the set has no '{cfg.hf_test_split}' split)"
    labelled = ", labels from " + cfg.hf_label_column if train.labels is not None else ""
    return train, test, f"{source}, column {column}{labelled}, split: {how}"
