"""Hugging Face ``datasets`` as a data source, offline: small real data sets built from MNIST and the CelebA
faces on disk, saved as save_to_disk folders, Parquet files and an image folder; pixels, labels, splits, the
one-line errors, training and an exact resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import DATA, require_data, train, train_cli
from utils.config import load_config
from utils.data.registry import load_data
from utils.data.splits import TensorImages
from utils.errors import UserError


def mnist_dict(n_train: int = 200, n_test: int = 50):
    """The first real MNIST digits as a DatasetDict with an Image and a ClassLabel column, and the originals."""
    import datasets

    train_set, test_set, _ = load_data(load_config(None, [f"data.root={require_data()}", "data.download=false"]).data)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})

    def split(s, n):
        return datasets.Dataset.from_dict({"image": [Image.fromarray(a[0].numpy()) for a in s.images[:n]],
                                           "label": s.labels[:n].tolist()}, features=features)

    return datasets.DatasetDict({"train": split(train_set, n_train), "test": split(test_set, n_test)}), \
        (train_set, test_set)


def hf_config(root, *extra: str):
    return load_config(None, ["data.name=hf", f"data.root={root}", "data.channels=1", "data.img_size=28",
                              *extra]).data


@pytest.fixture(scope="module")
def saved_mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "mnist"
    dd, originals = mnist_dict()
    dd.save_to_disk(str(root))
    return root, originals


def test_save_to_disk_folder_gives_the_same_pixels_and_labels(saved_mnist):
    root, (train_set, test_set) = saved_mnist
    train, test, summary = load_data(hf_config(root), 0)
    assert (len(train), len(test)) == (200, 50) and "save_to_disk" in summary and "labels from label" in summary
    assert torch.equal(train.get(torch.arange(200)), train_set.images[:200])  # PNG round trip: lossless
    assert torch.equal(test.get(torch.arange(50)), test_set.images[:50])
    assert torch.equal(train.labels, train_set.labels[:200]) and torch.equal(test.labels, test_set.labels[:50])
    arrow = list(root.rglob("*.arrow"))
    assert arrow and train.ds.cache_files  # read from the Arrow files on disk (memory-mapped), not copied


def test_parquet_files_and_a_held_out_fraction(tmp_path):
    dd, (train_set, _) = mnist_dict(100, 20)
    (tmp_path / "pq").mkdir()
    dd["train"].to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    dd["test"].to_parquet(str(tmp_path / "pq" / "test-00000.parquet"))
    cfg = hf_config(tmp_path / "pq", f"data.cache_dir={tmp_path / 'cache'}")
    train, test, summary = load_data(cfg, 0)
    assert (len(train), len(test)) == (100, 20) and "parquet" in summary
    assert torch.equal(train.get(torch.arange(100)), train_set.images[:100])
    # one file, no test split: a seeded fraction of the training split is held out
    cfg = hf_config(tmp_path / "pq" / "train-00000.parquet", "data.hf_test_split=", "data.test_fraction=0.2",
                    f"data.cache_dir={tmp_path / 'cache'}")
    train, test, summary = load_data(cfg, 0)
    assert (len(train), len(test)) == (80, 20) and "seeded 0.2 fraction of train" in summary
    seen = torch.cat([train.get(torch.arange(80)), test.get(torch.arange(20))])
    assert sorted(map(bytes, seen.flatten(1).numpy())) == sorted(map(bytes, train_set.images[:100].flatten(1).numpy()))


def test_image_folder_of_celeba_faces_and_the_decode_cache(tmp_path):
    faces = sorted((DATA / "celeba-10k" / "img_align_celeba").glob("*.jpg"))[:24]
    assert len(faces) == 24
    for i, f in enumerate(faces):
        split = "test" if i < 4 else "train"
        (tmp_path / "faces" / split / ("old" if i % 2 else "young")).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "faces" / split / ("old" if i % 2 else "young") / f.name)
    cfg = load_config(None, ["data.name=hf", f"data.root={tmp_path / 'faces'}", "data.img_size=32",
                             f"data.cache_dir={tmp_path / 'cache'}"]).data
    train, test, summary = load_data(cfg, 0)
    assert (len(train), len(test)) == (20, 4) and "imagefolder" in summary
    assert sorted(train.labels.tolist()) == [0] * 10 + [1] * 10
    x = train.get(torch.arange(20))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8 and x.float().std() > 20
    cfg.cache = True
    cached, _, _ = load_data(cfg, 0)
    assert isinstance(cached, TensorImages) and torch.equal(cached.images, x)
    assert torch.equal(cached.labels, train.labels)


def test_missing_columns_and_splits_list_what_exists(saved_mnist, tmp_path):
    root, _ = saved_mnist
    cases = [("data.hf_image_column=img", "is not a column of this data set (it has: image, label)"),
             ("data.hf_image_column=label", "is a ClassLabel column, not images: set it to an image column (image)"),
             ("data.hf_test_split=validation", "is not a split of this data set (it has: train, test)"),
             ("data.hf_label_column=digit", "'digit' is not a column of this data set")]
    for override, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_data(hf_config(root, override), 0)
    with pytest.raises(UserError, match="could not be read by datasets"):
        load_data(hf_config(tmp_path / "nothing-here", "data.hf_test_split="), 0)


def test_training_on_it_resumes_exactly(saved_mnist, tmp_path):
    """Images decoded by DataLoader workers from the Arrow files, labels for a conditional model: a run stopped
    at step 2 and resumed ends on the unbroken run's weights."""
    root, _ = saved_mnist
    common = ["data.name=hf", f"data.root={root}", "data.channels=1", "data.img_size=28", "data.num_workers=2",
              "model.conditional=true", "model.hidden=32", "train.batch_size=20", "train.save_every=2",
              "train.keep_checkpoints=0", "train.eval_every=4", "train.sample_every=4"]
    train(tmp_path / "full", extra=[*common, "train.steps=4"])
    train(tmp_path / "part", extra=[*common, "train.steps=2"])
    res = train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=4"])
    assert res.returncode == 0 and "at step 2" in res.stdout, res.stderr[-2000:]
    a, b = (load_file(tmp_path / r / "model.safetensors") for r in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "n_classes: 10" in (tmp_path / "full" / "config.yaml").read_text()
    assert np.isfinite(float((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1].split('"elbo": ')[1]
                             .split(",")[0]))
