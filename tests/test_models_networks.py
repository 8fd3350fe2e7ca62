"""Network shapes for the supported image sizes, the literature's 64 px network, and the residual blocks."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.networks import ResBlock, build_networks
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
