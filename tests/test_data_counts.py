"""A data set's counts without loading it (utils/data/counts.py) equal what loading gives, and resolving a config
fills in what the parts derive from them before --dry-run prints it: β-TCVAE's data-set size, a conditional
model's class count."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image

import train_vae
from conftest import DATA, REPO, cli, require_data, train
from utils.config import complete_config, load_config
from utils.data.counts import TORCHVISION_COUNTS, Counts
from utils.data.registry import DATASETS, class_count, image_shape, load_data
from utils.errors import UserError


def loaded(data) -> Counts:
    """The counts as the trainer reads them: the training split's length, class_count's classes (None when it
    refuses the set for having no labels)."""
    train_set, test_set, _ = load_data(data)
    try:
        classes = class_count(train_set, test_set)
    except UserError as e:
        assert "has none" in str(e), e
        classes = None
    return Counts(len(train_set), classes)


def counted(data) -> Counts:
    ds = DATASETS[data.name]
    assert ds.counts is not None  # the set counts without loading: what this file tests
    return ds.count(data)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_torchvision_sets_count_from_their_label_files(name, real_data):
    data = load_config(None, [f"data.name={name}", f"data.root={real_data}", "data.download=false"]).data
    assert counted(data) == loaded(data) == Counts(60_000, 10)


def test_a_torchvision_set_not_yet_downloaded_counts_as_the_official_files(tmp_path):
    data = load_config(None, [f"data.root={tmp_path}"]).data
    assert counted(data) == Counts(*TORCHVISION_COUNTS["MNIST"])
    assert list(tmp_path.iterdir()) == []  # counting downloads nothing


def test_a_label_file_with_fewer_images_and_classes_is_read_not_assumed(tmp_path):
    """A set in MNIST's format but not MNIST's size (labels 0..3, 7 training images): the counts read the files."""
    raw = require_data() / "MNIST" / "raw"
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    for part, n in (("train", 7), ("t10k", 3)):
        images = (raw / f"{part}-images-idx3-ubyte").read_bytes()
        (tmp_path / "MNIST" / "raw" / f"{part}-images-idx3-ubyte").write_bytes(
            images[:4] + n.to_bytes(4, "big") + images[8:16 + n * 784])
        labels = bytes([0, 1, 2, 3, 1, 2, 0][:n])
        (tmp_path / "MNIST" / "raw" / f"{part}-labels-idx1-ubyte").write_bytes(
            b"\0\0\x08\x01" + n.to_bytes(4, "big") + labels)
    data = load_config(None, [f"data.root={tmp_path}", "data.download=false"]).data
    assert counted(data) == loaded(data) == Counts(7, 4)


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_dsprites_renderer_counts_its_seeded_split(fraction):
    data = load_config(None, ["data.name=dsprites", f"data.test_fraction={fraction}", "data.root=/nonexistent"]).data
    assert counted(data) == loaded(data)
    assert counted(data).train == 737_280 - round(737_280 * fraction)


def test_dsprites_official_file_counts_from_its_header(tmp_path):
    """An npz in the official layout with 50 images (not the grid's 737,280): the count is the file's."""
    imgs, classes = np.zeros((50, 64, 64), np.uint8), np.zeros((50, 6), np.int64)
    with zipfile.ZipFile(tmp_path / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz", "w") as zf:
        for name, arr in (("imgs.npy", imgs), ("latents_classes.npy", classes)):
            with zf.open(name, "w") as f:
                np.lib.format.write_array(f, arr)
    data = load_config(None, ["data.name=dsprites", f"data.root={tmp_path}", f"data.cache_dir={tmp_path / 'c'}",
                              "data.test_fraction=0.1"]).data
    assert counted(data) == Counts(45, None)
    assert not (tmp_path / "c").exists()  # counting copies nothing into the cache
    assert loaded(data) == Counts(45, None)


def _folder(root, layout: dict[str, int]) -> None:
    for sub, n in layout.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((6, 6), 5 * i, np.uint8)).save(root / sub / f"{i}.png")


@pytest.mark.parametrize("layout, extra", [
    ({"a": 5, "b": 3, "c/deeper": 4}, []),       # three classes, one nested a level down
    ({"a": 5, "b": 3}, ["data.labels=false"]),   # sub-folders, labels off
    ({".": 9}, []),                              # no sub-folders: no labels
    ({"a": 40, "b": 1}, ["data.test_fraction=0.5"]),  # a class whose one image may be held out
])
def test_image_folder_counts_its_listing(tmp_path, layout, extra):
    _folder(tmp_path / "imgs", layout)
    data = load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'imgs'}", "data.img_size=6",
                              *extra]).data
    train_set, test_set, _ = DATASETS["image_folder"].load(data, image_shape(data))
    labels = [s.labels for s in (train_set, test_set)]
    expected_classes = None if labels[0] is None else max(int(y.max()) for y in labels) + 1
    assert counted(data) == Counts(len(train_set), expected_classes)


def test_image_folder_counts_say_no_more_than_loading_refuses(tmp_path):
    """Images outside any class folder: the counts give the sub-folders' classes; loading refuses the set, as
    before, in one line."""
    _folder(tmp_path / "imgs", {"a": 3, "b": 3, ".": 2})
    data = load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'imgs'}", "data.img_size=6"]).data
    assert counted(data).classes == 2
    train_set, test_set, _ = load_data(data)
    with pytest.raises(UserError, match="some images lie directly in data.root"):
        class_count(train_set, test_set, 2)
    with pytest.raises(UserError, match="is not a folder"):  # the loader's own error, from counting
        counted(load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'none'}"]).data)


def dry_run(argv: list[str]) -> dict:
    res = cli(train_vae.main, [*argv, "--dry-run"])
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_dry_run_prints_the_values_parts_derive_from_the_data(tmp_path, real_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mnist = ["-c", str(REPO / "configs/mnist.yaml"), f"data.root={real_data}", "data.download=false"]
    assert dry_run([*mnist, "loss.regulariser=tcvae"])["loss"]["tc_dataset_size"] == 60_000
    assert dry_run([*mnist, "loss.regulariser=tcvae", "loss.tc_dataset_size=5"])["loss"]["tc_dataset_size"] == 5
    assert dry_run([*mnist, "model.conditional=true"])["model"]["n_classes"] == 10
    assert dry_run(mnist)["loss"]["tc_dataset_size"] == 0  # a part that derives nothing is left as it is
    celeba = dry_run(["-c", str(REPO / "configs/celeba.yaml"), f"data.root={DATA / 'celeba-10k'}",
                      "loss.regulariser=tcvae"])  # a set counted by loading it (a listing of its files)
    assert celeba["loss"]["tc_dataset_size"] == len(load_data(load_config(None, [
        "data.name=celeba", f"data.root={DATA / 'celeba-10k'}"]).data)[0])
    assert list(tmp_path.iterdir()) == []


def test_a_run_records_what_the_dry_run_printed(tmp_path, real_data, monkeypatch):
    """config.yaml of the run holds the resolved values; a resumed run whose config.yaml has 0 (written before
    these keys were filled) gets them filled, as its first start would have."""
    extra = ["loss.regulariser=tcvae", "model.conditional=true", "train.steps=2", "train.save_every=2"]
    train(tmp_path / "run", extra=extra)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (recorded["loss"]["tc_dataset_size"], recorded["model"]["n_classes"]) == (60_000, 10)
    cfg = load_config(tmp_path / "run" / "config.yaml", ["loss.tc_dataset_size=0", "model.n_classes=0"])
    assert complete_config(cfg).loss.tc_dataset_size == 60_000 and cfg.model.n_classes == 10
