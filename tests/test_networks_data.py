"""Network shapes for the supported image sizes, and the index-based data order."""

from __future__ import annotations

import pytest
import torch

from models.networks import ResBlock, build_networks
from utils.config import DataConfig, ModelConfig
from utils.data.batching import BatchOrder, shard
from utils.data.registry import load_data
from utils.errors import UserError


@pytest.mark.parametrize("net", ["mlp", "conv", "resconv"])
@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n_params", [1, 2])
def test_network_shapes(net, size, channels, n_params):
    mults = [1, 2, 4] if size < 64 else [1, 2, 4, 8]
    m = ModelConfig(net=net, z_dim=5, hidden=[32], base_width=8, channel_mults=mults)
    enc, dec = build_networks(m, (channels, size, size), n_params)
    mu, logvar = enc(torch.rand(2, channels, size, size))
    assert mu.shape == logvar.shape == (2, 5)
    assert dec(mu).shape == (2, channels * n_params, size, size)


def test_literature_network_for_64_px():
    """disentanglement_lib's conv_encoder/deconv_decoder: its layer shapes and parameter count (encoder: convs
    1·32·16+32, 32·32·16+32, 32·64·4+64, 64·64·4+64, then 1024·256+256 and 256·2z+2z; decoder mirrored), and
    64 px only."""
    m = ModelConfig(net="dislib", z_dim=10)
    enc, dec = build_networks(m, (1, 64, 64), 1)
    mu, _ = enc(torch.rand(2, 1, 64, 64))
    assert mu.shape == (2, 10) and dec(mu).shape == (2, 1, 64, 64)
    encoder = (16 * 32 + 32) + (32 * 32 * 16 + 32) + (32 * 64 * 4 + 64) + (64 * 64 * 4 + 64) + (1024 * 256 + 256) \
        + (256 * 20 + 20)
    decoder = (10 * 256 + 256) + (256 * 1024 + 1024) + (64 * 64 * 16 + 64) + (64 * 32 * 16 + 32) \
        + (32 * 32 * 16 + 32) + (32 * 1 * 16 + 1)
    assert sum(p.numel() for p in enc.parameters()) == encoder
    assert sum(p.numel() for p in dec.parameters()) == decoder
    with pytest.raises(UserError, match="64x64 architecture"):
        build_networks(m, (1, 28, 28), 1)


def test_residual_block_starts_as_the_identity_and_learns_away_from_it():
    torch.manual_seed(0)
    block, x = ResBlock(4, "relu"), torch.randn(3, 4, 8, 8)
    assert torch.equal(block(x), x)
    target = torch.randn(3, 4, 8, 8)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    before = (block(x) - target).square().mean().item()
    for _ in range(5):
        opt.zero_grad()
        (block(x) - target).square().mean().backward()
        opt.step()
    assert (block(x) - target).square().mean().item() < before


def test_residual_network_codes_one_image_independently_of_its_batch():
    """No batch norm in resconv: an image's code and decoding are the same alone or in a batch of 8."""
    torch.manual_seed(0)
    enc, dec = build_networks(ModelConfig(net="resconv", z_dim=3, base_width=4, channel_mults=[1, 2], res_blocks=2),
                              (1, 28, 28), 1)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        mu, _ = enc(x)
        alone, _ = enc(x[:1])
        torch.testing.assert_close(alone, mu[:1])
        torch.testing.assert_close(dec(mu[:1]), dec(mu)[:1])


def test_conv_geometry_error_names_the_fix():
    with pytest.raises(UserError, match="model.channel_mults has 6 stride-2 layers.*at most 5"):
        build_networks(ModelConfig(net="conv", z_dim=4, base_width=8, channel_mults=[1] * 6), (1, 32, 32), 1)


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
