"""The index-based data order, MNIST read once as uint8, and why a data set could not be had."""

from __future__ import annotations

import pytest
import torch

from utils.config import DataConfig
from utils.data.batching import BatchOrder, shard
from utils.data.registry import load_data
from utils.errors import UserError


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(10, 3, seed=7)  # 3 batches per epoch, one image dropped
    epoch0 = torch.cat([order.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9
    assert not torch.equal(torch.cat([order.indices(s) for s in range(3, 6)]), epoch0)
    assert torch.equal(BatchOrder(10, 3, seed=7).indices(4), order.indices(4))  # a pure function of the step
    assert not torch.equal(BatchOrder(10, 3, seed=8).indices(0), order.indices(0))
    g = torch.arange(7)
    assert torch.equal(torch.cat([shard(g, r, 2) for r in range(2)]), g)


def test_mnist_loads_once_as_uint8(real_data):
    train, test, summary = load_data(DataConfig(name="mnist", root=str(real_data), download=False))
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 10000 and test.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the published test labels
    x = train.batch(torch.tensor([0, 1]))
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert "train=60000 test=10000 shape=1x28x28" in summary
    resized, _, _ = load_data(DataConfig(name="fashion_mnist", root=str(real_data), download=False, img_size=32))
    assert resized.shape == (1, 32, 32)


def test_missing_data_names_where_to_put_it(tmp_path):
    with pytest.raises(UserError, match="MNIST not found in .*MNIST/raw.*data.download=true"):
        load_data(DataConfig(name="mnist", root=str(tmp_path), download=False))


@pytest.mark.parametrize("case", ["dangling link", "a file in the way", "no network"])
def test_failed_download_names_the_real_cause(case, tmp_path, monkeypatch):
    """torchvision's own download path, with a data.root that cannot hold it or no network to fetch it."""
    import urllib.error
    import urllib.request

    if case == "dangling link":  # a link to a folder of another machine
        root = tmp_path / "data"
        root.symlink_to(tmp_path / "elsewhere" / "data")
        needle = f"{root} is a symbolic link to {tmp_path / 'elsewhere' / 'data'}, which does not exist"
    elif case == "a file in the way":
        (tmp_path / "afile").write_text("x")
        root = tmp_path / "afile" / "data"
        needle = f"{tmp_path / 'afile'} is a file, not a folder"
    else:
        root = tmp_path / "data"
        needle = "could not be downloaded (no network? Error downloading train-images-idx3-ubyte.gz)"
    attempts = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as e:
        load_data(DataConfig(name="mnist", root=str(root), download=True))
    message = str(e.value)
    assert needle in message and f"put the official files in {root / 'MNIST' / 'raw'}" in message, message
    assert "\n" not in message
    assert bool(attempts) == (case == "no network")  # a bad root fails before any download is tried
