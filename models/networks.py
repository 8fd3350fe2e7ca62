"""Encoder/decoder networks, registered by their YAML name (``model.net``).

An encoder maps images (B, C, H, W) to the 2·z parameters of q(z|x): (mu, logvar).
A decoder maps z (B, z) to raw per-pixel parameters (B, C·n_params, H, W); what
they mean (logits, means, log-variances) is the likelihood's business.

A network is an encoder class and its mirror decoder class, constructed as
``Encoder(img_shape, z_dim, m, n_cond)`` and ``Decoder(img_shape, z_dim, n_params, m)``
with ``m`` the ``model`` config section, from which each reads its own keys;
adding one is that pair plus one ``NETWORKS`` entry. An encoder whose class sets ``convolutional = True`` is
run on channels-last images (``train.channels_last``). A conditional VAE gives the
encoder a one-hot label c (B, n_cond) beside the image (``forward(x, c)``): an MLP
reads it with the flattened pixels, a convolutional encoder as n_cond constant
input channels. Its decoder is built for z_dim + n_cond inputs and reads [z, c]. An encoder whose class sets
``hierarchical = True`` is a ladder of stochastic layers (models/ladder.py) whose ``forward`` gives the top layer's
posterior.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.klae import KLADecoder, KLAEncoder
from models.ladder import LadderConvDecoder, LadderConvEncoder, LadderDecoder, LadderEncoder
from models.layers import ACTIVATIONS, LastLayer, conv_geometry
from utils.errors import UserError

if TYPE_CHECKING:
    from models.config import ModelConfig


def _mlp(sizes: list[int], activation: str) -> list[nn.Module]:
    """Linear layers through ``sizes``, the activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return layers


def label_maps(x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """Images (B, C, H, W) with a one-hot label (B, n) appended as n constant channels (B, C + n, H, W)."""
    if c is None:
        return x
    maps = c.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
    return torch.cat([x, maps], 1)


class MLPEncoder(nn.Module):
    """Fully connected, ``model.hidden`` units per layer: [400] is the classic 784-400-z of Kingma & Welling
    2014, [200, 200] with tanh Burda et al. 2016's. For any image shape."""

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, m: ModelConfig, n_cond: int = 0):
        super().__init__()
        sizes = [math.prod(img_shape) + n_cond, *m.hidden, 2 * z_dim]
        self.net = nn.Sequential(nn.Flatten(), *_mlp(sizes, m.activation))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x if c is None else torch.cat([x.flatten(1), c.to(x.dtype)], 1)  # the label beside the pixels
        mu, logvar = self.net(h).chunk(2, dim=1)  # (B, z) each
        return mu, logvar


class MLPDecoder(LastLayer, nn.Module):
    """The encoder's mirror: ``model.hidden`` reversed."""

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, n_params: int, m: ModelConfig):
        super().__init__()
        c, h, w = img_shape
        self.out_shape = (c * n_params, h, w)
        self.net = nn.Sequential(*_mlp([z_dim, *reversed(m.hidden), math.prod(self.out_shape)], m.activation))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.out_shape)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


class ConvEncoder(nn.Module):
    """4x4 stride-2 convolutions + batch norm + LeakyReLU, halving the image at each layer."""

    convolutional = True  # faster on channels-last images

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, m: ModelConfig, n_cond: int = 0):
        super().__init__()
        c, size, _ = img_shape
        widths = [m.base_width * k for k in m.channel_mults]
        self.pad, bottom = conv_geometry(size, len(widths))
        self.convs = nn.Sequential(*[_down(a, b) for a, b in zip([c + n_cond] + widths[:-1], widths)])
        self.fc = nn.Linear(widths[-1] * bottom * bottom, 2 * z_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = label_maps(x, c)
        if self.pad:
            p = self.pad // 2
            x = F.pad(x, (p, self.pad - p, p, self.pad - p))
        h = self.convs(x).flatten(1)  # (B, widths[-1]·bottom²)
        mu, logvar = self.fc(h).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(LastLayer, nn.Module):
    """Mirror of ``ConvEncoder`` with transposed convolutions; crops the padding back off."""

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, n_params: int, m: ModelConfig):
        super().__init__()
        c, size, _ = img_shape
        widths = [m.base_width * k for k in m.channel_mults]
        self.pad, self.bottom = conv_geometry(size, len(widths))
        self.size = size
        self.fc = nn.Linear(z_dim, widths[-1] * self.bottom * self.bottom)
        rev = widths[::-1]
        ups = [_up(a, b) for a, b in zip(rev[:-1], rev[1:])]
        self.convs = nn.Sequential(*ups, nn.ConvTranspose2d(widths[0], c * n_params, 4, 2, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], -1, self.bottom, self.bottom)
        out = self.convs(h)  # (B, C·n_params, size + pad, size + pad)
        if self.pad:
            p = self.pad // 2
            out = out[:, :, p:p + self.size, p:p + self.size]
        return out


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))), 3x3, pre-activation (He et al. 2016). The second convolution starts at zero,
    so a fresh block is the identity and a deep stack trains like a shallow one at first (Goyal et al. 2017)."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.net = nn.Sequential(ACTIVATIONS[activation](), nn.Conv2d(width, width, 3, 1, 1),
                                 ACTIVATIONS[activation](), nn.Conv2d(width, width, 3, 1, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _res_widths(m: ModelConfig, size: int) -> tuple[list[int], int, int]:
    widths = [m.base_width * k for k in m.channel_mults]
    return widths, *conv_geometry(size, len(widths))


class ResConvEncoder(nn.Module):
    """A residual network: a 3x3 stem, then at each resolution ``model.res_blocks`` residual blocks and a 4x4
    stride-2 convolution to the next width. No normalisation layers, so a batch's images do not influence each
    other's codes (batch norm does, which the IWAE bound and per-image evaluation do not assume)."""

    convolutional = True  # faster on channels-last images

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, m: ModelConfig, n_cond: int = 0):
        super().__init__()
        c, size, _ = img_shape
        widths, self.pad, bottom = _res_widths(m, size)
        layers: list[nn.Module] = [nn.Conv2d(c + n_cond, widths[0], 3, 1, 1)]
        for i, w in enumerate(widths):
            layers += [ResBlock(w, m.activation) for _ in range(m.res_blocks)]
            layers.append(nn.Conv2d(w, widths[min(i + 1, len(widths) - 1)], 4, 2, 1))
        self.convs = nn.Sequential(*layers, ACTIVATIONS[m.activation](), nn.Flatten())
        self.fc = nn.Linear(widths[-1] * bottom * bottom, 2 * z_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pad // 2
        x = label_maps(x, c)
        mu, logvar = self.fc(self.convs(F.pad(x, (p, self.pad - p, p, self.pad - p)))).chunk(2, dim=1)
        return mu, logvar


class ResConvDecoder(LastLayer, nn.Module):
    """Mirror of ``ResConvEncoder``: 4x4 stride-2 transposed convolutions, each followed by residual blocks, then
    a 3x3 convolution to the likelihood's parameters; crops the padding back off."""

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, n_params: int, m: ModelConfig):
        super().__init__()
        c, self.size, _ = img_shape
        widths, self.pad, self.bottom = _res_widths(m, self.size)
        self.fc = nn.Linear(z_dim, widths[-1] * self.bottom * self.bottom)
        layers: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            layers.append(nn.ConvTranspose2d(widths[min(i + 1, len(widths) - 1)], widths[i], 4, 2, 1))
            layers += [ResBlock(widths[i], m.activation) for _ in range(m.res_blocks)]
        self.convs = nn.Sequential(*layers, ACTIVATIONS[m.activation](), nn.Conv2d(widths[0], c * n_params, 3, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.convs(self.fc(z).view(z.shape[0], -1, self.bottom, self.bottom))
        p = self.pad // 2
        return out[:, :, p:p + self.size, p:p + self.size]


def _need_64(img_shape: tuple[int, int, int]) -> None:
    if img_shape[1:] != (64, 64):
        raise UserError(f"model.net=dislib is the 64x64 architecture of the disentanglement literature; these images "
                        f"are {img_shape[1]}x{img_shape[2]}: set data.img_size=64, or use model.net=conv")


class DislibEncoder(nn.Module):
    """The convolutional encoder of the disentanglement literature for 64x64 images (Higgins et al. 2017, Table 1
    row 3; disentanglement_lib's ``conv_encoder``, which Locatello et al. 2019 train): 32-32 4x4 and 64-64 2x2
    stride-2 convolutions with ReLU, a 256-unit layer, then the posterior's parameters. No batch norm."""

    convolutional = True  # faster on channels-last images

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, m: ModelConfig, n_cond: int = 0):
        super().__init__()
        _need_64(img_shape)
        self.net = nn.Sequential(
            nn.Conv2d(img_shape[0] + n_cond, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 2, 2), nn.ReLU(), nn.Conv2d(64, 64, 2, 2), nn.ReLU(), nn.Flatten(),
            nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 2 * z_dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(label_maps(x, c)).chunk(2, dim=1)
        return mu, logvar


class DislibDecoder(LastLayer, nn.Module):
    """Its decoder (disentanglement_lib's ``deconv_decoder``): 256 and 1024 units, then 64-32-32 4x4 stride-2
    transposed convolutions with ReLU and a last one to the likelihood's parameters."""

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, n_params: int, m: ModelConfig):
        super().__init__()
        _need_64(img_shape)
        self.net = nn.Sequential(
            nn.Linear(z_dim, 256), nn.ReLU(), nn.Linear(256, 1024), nn.ReLU(), nn.Unflatten(1, (64, 4, 4)),
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, img_shape[0] * n_params, 4, 2, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


NETWORKS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "mlp": (MLPEncoder, MLPDecoder),
    "conv": (ConvEncoder, ConvDecoder),
    "resconv": (ResConvEncoder, ResConvDecoder),
    "dislib": (DislibEncoder, DislibDecoder),
    "ladder": (LadderEncoder, LadderDecoder),              # L stochastic layers: models/ladder.py
    "ladder_conv": (LadderConvEncoder, LadderConvDecoder),
    "klae": (KLAEncoder, KLADecoder),                      # Stable Diffusion's AutoencoderKL: models/klae.py
}


def build_networks(m: ModelConfig, img_shape: tuple[int, int, int], n_params: int,
                   n_cond: int = 0) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) for ``model.net``; with ``n_cond`` > 0 both also read a one-hot label of that size."""
    encoder, decoder = NETWORKS[m.net]
    if m.latent_dims and not getattr(encoder, "hierarchical", False):
        ladders = ", ".join(k for k, (e, _) in NETWORKS.items() if getattr(e, "hierarchical", False))
        raise UserError(f"model.latent_dims={m.latent_dims} asks for stochastic layers, which model.net={m.net} "
                        f"does not have: use model.net={ladders.replace(', ', ' or ')}, or drop latent_dims")
    if m.init_from and not hasattr(decoder, "init_from"):
        able = " or ".join(k for k, (_, d) in NETWORKS.items() if hasattr(d, "init_from"))
        raise UserError(f"model.init_from reads a diffusers AutoencoderKL folder, which model.net={m.net} cannot "
                        f"take: use model.net={able}, or drop init_from")
    return encoder(img_shape, m.z_dim, m, n_cond), decoder(img_shape, m.z_dim + n_cond, n_params, m)
