"""A hierarchical VAE as a network pair: the Ladder VAE (Sønderby et al. 2016), ``model.net: ladder`` (MLP) and
``ladder_conv`` (a small convolutional first layer), with L stochastic layers of sizes ``model.latent_dims``
(bottom first) and one deterministic width per layer, ``model.hidden``.

Why a network, not a second model or trainer: the toolkit's parts already meet at one code z with a prior p(z).
Here that z is the top layer z_L: the encoder's ``forward`` gives q(z_L|x), which is purely bottom-up in a
ladder, so the prior registry (a VampPrior over z_L included), the ex-post samplers, traversals, active units
and the API all work on z_L unchanged. The layers below are the network's own business:

    generative   p(z_L) = the model's prior;  p(z_l | z_l+1) = N(μ_p, σ_p²) from a top-down MLP;  p(x | z_1)
    inference    bottom-up d_l = MLP(d_l−1), d_0 = x, giving (μ̂_l, σ̂_l²); q(z_L|x) = N(μ̂_L, σ̂_L²);
                 q(z_l | z_l+1, x) merges the bottom-up and top-down Gaussians by precision (Sønderby et al.
                 2016, eqs. 17-18):  σ_q² = 1 / (σ̂⁻² + σ_p⁻²),  μ_q = (μ̂ σ̂⁻² + μ_p σ_p⁻²) σ_q²

Each block is two dense layers of width ``model.hidden[l]`` (Sønderby et al.'s and Burda et al. 2016's two-layer
models), so with L = 1 the ladder is exactly ``model.net: mlp`` with ``hidden: [h, h]``. The top-down pass from
z_L (``LadderDecoder.posterior``) draws z_L−1 ... z_1 in turn and returns, beside the decoder's output, each
lower layer's KL(q(z_l | z_l+1, x) || p(z_l | z_l+1)) in closed form at the drawn z_l+1 (the per-layer KL the
trainer logs) and Σ_l log p(z_l | z_l+1) − log q(z_l | z_l+1, x) at the drawn codes (what the importance
weights of the IWAE bound add for the lower layers). Decoding a top code alone (``forward``: sample grids,
traversals, ex-post samplers) takes each lower layer at its conditional prior mean, so a code decodes to one image;
with a temperature T > 0 (``sample.py --temperature``) the lower layers are drawn with their std scaled by T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import ACTIVATIONS, LastLayer, conv_geometry
from utils.errors import UserError

if TYPE_CHECKING:
    from models.config import ModelConfig

Params = tuple[torch.Tensor, torch.Tensor]  # (mu, logvar), each (B, z_l)


@dataclass
class Lower:
    """What the top-down pass drew below the top layer, for k·B codes: per lower layer (bottom first) the KL
    (k·B,) and the posterior means (k·B, z_l), and Σ_l log p(z_l | z_l+1) − log q(z_l | z_l+1, x) (k·B,)."""

    kl: list[torch.Tensor] = field(default_factory=list)
    means: list[torch.Tensor] = field(default_factory=list)
    log_ratio: torch.Tensor | float = 0.0


def _block(n_in: int, width: int, activation: type[nn.Module]) -> nn.Sequential:
    """Two dense layers of ``width`` units, each followed by the activation."""
    return nn.Sequential(nn.Linear(n_in, width), activation(), nn.Linear(width, width), activation())


def merge(bottom_up: Params, top_down: Params) -> Params:
    """The precision-weighted merge of two Gaussians (Sønderby et al. 2016, eqs. 17-18), in log-variances:
    μ_q = μ̂ · w + μ_p · (1 − w) with w = σ̂⁻² / (σ̂⁻² + σ_p⁻²) = sigmoid(log σ_p² − log σ̂²)."""
    (mu_b, lv_b), (mu_p, lv_p) = bottom_up, top_down
    w = torch.sigmoid(lv_p - lv_b)
    return mu_b * w + mu_p * (1 - w), -torch.logaddexp(-lv_b, -lv_p)


def merged_terms(bottom_up: Params, top_down: Params,
                 eps: torch.Tensor) -> tuple[Params, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the merged posterior q of ``merge`` and the conditional prior p: q's (μ_q, log σ_q²), the code
    z = μ_q + σ_q·ε, the KL(q || p) and log p(z) − log q(z) per element, written in ε and d = log σ_p² − log σ̂² so
    no step divides by σ_p².

    Why: where a layer is unused its conditional prior can be very tight (log σ_p² ≈ −64 was seen on a trained
    ladder) and q is as tight; then (z − μ_p)² / σ_p² in float32 is rounding error over a denormal, and the IWAE
    weight turned inf − inf. In these terms, with s = log σ_p² − log σ_q² = softplus(d) and
    (μ_q − μ_p) / σ_p = (μ̂ − μ_p) · sigmoid(d) / σ_p, the standardised residual is r = (z − μ_p) / σ_p =
    (μ_q − μ_p) / σ_p + ε · e^(−s/2), so log p(z) − log q(z) = ½(ε² − r²) − ½ s and
    KL = ½ (s + e^(−s) − 1 + ((μ_q − μ_p) / σ_p)²), exactly the Gaussians' closed forms."""
    (mu_b, lv_b), (mu_p, lv_p) = bottom_up, top_down
    d = lv_p - lv_b
    mu, logvar = merge(bottom_up, top_down)
    s = F.softplus(d)
    m = (mu_b - mu_p) * torch.exp(F.logsigmoid(d) - 0.5 * lv_p)
    r = m + eps * torch.exp(-0.5 * s)
    kl = 0.5 * (s + torch.expm1(-s) + m.pow(2))
    return (mu, logvar), mu + eps * torch.exp(0.5 * logvar), kl, 0.5 * (eps.pow(2) - r.pow(2)) - 0.5 * s


def _check(img_shape: tuple[int, int, int], m: ModelConfig, n_cond: int) -> list[int]:
    """The layer sizes, refused in one line where the config cannot build a ladder (also checked, torch-free,
    when the config is validated; here for a config built in code)."""
    dims = list(m.latent_dims)
    if not dims:
        raise UserError(f"model.net={m.net} is a ladder of stochastic layers and needs model.latent_dims, their "
                        f"sizes bottom first (e.g. [64, 32]): set it")
    if len(m.hidden) != len(dims) or dims[-1] != m.z_dim:
        raise UserError(f"the ladder's layers do not chain: model.latent_dims={dims} needs one width per layer in "
                        f"model.hidden (got {m.hidden}) and model.z_dim={dims[-1]}, its top layer (got {m.z_dim})")
    if n_cond:
        raise UserError(f"model.net={m.net} has no conditional form: set model.conditional=false")
    return dims


class LadderEncoder(nn.Module):
    """The bottom-up path: blocks d_l = MLP(d_l−1), each with a head giving (μ̂_l, log σ̂_l²)."""

    hierarchical = True

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, m: ModelConfig, n_cond: int = 0):
        super().__init__()
        dims, act = _check(img_shape, m, n_cond), ACTIVATIONS[m.activation]
        first = self.first_block(img_shape, m.hidden[0], act, m)
        self.blocks = nn.ModuleList([first, *(_block(a, b, act) for a, b in zip(m.hidden[:-1], m.hidden[1:]))])
        self.heads = nn.ModuleList([nn.Linear(h, 2 * z) for h, z in zip(m.hidden, dims)])

    def first_block(self, img_shape: tuple[int, int, int], width: int, act: type[nn.Module],
                    m: ModelConfig) -> nn.Module:
        return nn.Sequential(nn.Flatten(), _block(math.prod(img_shape), width, act))

    def layers(self, x: torch.Tensor) -> list[Params]:
        """(μ̂_l, log σ̂_l²) of every layer, bottom first, each (B, z_l)."""
        out, d = [], x
        for block, head in zip(self.blocks, self.heads):
            d = block(d)
            mu, logvar = head(d).chunk(2, dim=1)
            out.append((mu, logvar))
        return out

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> Params:
        """q(z_L | x), the top layer's posterior: what the rest of the toolkit calls the posterior."""
        return self.layers(x)[-1]


class LadderDecoder(LastLayer, nn.Module):
    """The top-down path: p(z_l | z_l+1) for l = L−1 ... 1 from two-layer MLPs of width ``hidden[l]``, and
    p(x | z_1) from the mirror of the first encoder block."""

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, n_params: int, m: ModelConfig):
        super().__init__()
        dims, act = _check(img_shape, m, 0), ACTIVATIONS[m.activation]
        # top_down[l] maps z_l+2 to the parameters of z_l+1 (0-based l = 0 .. L−2: to layers 1 .. L−1)
        self.top_down = nn.ModuleList([nn.Sequential(_block(dims[i + 1], m.hidden[i + 1], act),
                                                     nn.Linear(m.hidden[i + 1], 2 * dims[i]))
                                       for i in range(len(dims) - 1)])
        self.out = self.output_block(img_shape, n_params, dims[0], m.hidden[0], act, m)

    def output_block(self, img_shape: tuple[int, int, int], n_params: int, z_1: int, width: int,
                     act: type[nn.Module], m: ModelConfig) -> nn.Module:
        c, h, w = img_shape
        return nn.Sequential(_block(z_1, width, act), nn.Linear(width, c * n_params * h * w),
                             nn.Unflatten(1, (c * n_params, h, w)))

    def prior_params(self, layer: int, z_above: torch.Tensor) -> Params:
        """(μ_p, log σ_p²) of p(z_layer | z_layer+1) in fp32 (0-based ``layer`` below the top)."""
        mu, logvar = self.top_down[layer](z_above).float().chunk(2, dim=1)
        return mu, logvar

    def posterior(self, z: torch.Tensor, bottom_up: list[Params], draw: bool = True) -> tuple[torch.Tensor, Lower]:
        """The decoder's output (N, C·n_params, H, W) and the lower layers' terms for top codes z (N, z_L) and the
        bottom-up parameters of the lower layers (N, z_l) each; ``draw=False`` takes each posterior mean."""
        lower = Lower()
        log_ratio = torch.zeros(len(z), device=z.device)
        for layer in reversed(range(len(self.top_down))):
            p = self.prior_params(layer, z)
            b = tuple(t.float() for t in bottom_up[layer])
            eps = torch.randn_like(p[0]) if draw else torch.zeros_like(p[0])
            (mu, _), z, kl, ratio = merged_terms(b, p, eps)
            lower.kl.insert(0, kl.sum(1))
            lower.means.insert(0, mu)
            log_ratio = log_ratio + ratio.sum(1)
        lower.log_ratio = log_ratio
        return self.out(z), lower

    def layer_posteriors(self, z: torch.Tensor,
                         bottom_up: list[Params]) -> list[tuple[Params, Params, torch.Tensor]]:
        """Each lower layer's posterior q(z_l | z_l+1, x), conditional prior p(z_l | z_l+1) and KL(q || p) per
        element (N, z_l), bottom first, in fp32, every layer above taken at its posterior mean (top codes z (N, z_L)):
        where a traversal of a lower layer starts, and what ranks its dimensions by KL."""
        out: list[tuple[Params, Params, torch.Tensor]] = []
        for layer in reversed(range(len(self.top_down))):
            p = self.prior_params(layer, z)
            q, _, kl, _ = merged_terms(tuple(t.float() for t in bottom_up[layer]), p, torch.zeros_like(p[0]))
            out.insert(0, (q, p, kl))
            z = q[0]
        return out

    def prior_means(self, z: torch.Tensor, layer: int) -> Params:
        """p(z_layer | z_layer+1) (0-based ``layer`` below the top) for top codes z (N, z_L), every layer between
        at its conditional prior mean: where a traversal of a lower layer from a prior draw starts."""
        for above in reversed(range(layer + 1, len(self.top_down))):
            z = self.prior_params(above, z)[0].to(z.dtype)
        return self.prior_params(layer, z)

    def from_layer(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """Decode codes z (N, z_layer) of 0-based ``layer`` below the top, each layer under it at its conditional
        prior mean: what a traversal of that layer shows."""
        for below in reversed(range(layer)):
            z = self.prior_params(below, z)[0].to(z.dtype)
        return self.out(z)

    def forward(self, z: torch.Tensor, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode top codes (N, z_L), each lower layer at its conditional prior mean, or with ``temperature`` T > 0
        drawn from p(z_l | z_l+1) with its standard deviation times T (from ``generator``: the same draws on any
        device for a CPU one), as hierarchical VAEs are sampled at reduced temperature (Vahdat & Kautz 2020)."""
        for layer in reversed(range(len(self.top_down))):
            mu, logvar = self.prior_params(layer, z)
            if temperature:
                where = generator.device if generator is not None else mu.device
                eps = torch.randn(mu.shape, generator=generator, device=where).to(mu.device)
                mu = mu + temperature * eps * torch.exp(0.5 * logvar)
            z = mu.to(z.dtype)
        return self.out(z)


def _conv_widths(m: ModelConfig, size: int) -> tuple[list[int], int, int]:
    widths = [m.base_width * k for k in m.channel_mults]
    return widths, *conv_geometry(size, len(widths))


class _Pad(nn.Module):
    """Pads (a positive ``pad``) or crops (negative) each side of the feature maps, as the conv nets do."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = abs(self.pad)
        a, b = p // 2, p - p // 2
        return F.pad(x, (a, b, a, b)) if self.pad >= 0 else x[:, :, a:x.shape[2] - b, a:x.shape[3] - b]


class LadderConvEncoder(LadderEncoder):
    """The ladder with a convolutional first block: ``model.channel_mults`` 4x4 stride-2 convolutions (no batch
    norm: a batch's images do not influence each other's codes, which the IWAE bound assumes), then a dense layer
    of width ``hidden[0]``. The layers above are the MLP ladder's."""

    convolutional = True

    def first_block(self, img_shape: tuple[int, int, int], width: int, act: type[nn.Module],
                    m: ModelConfig) -> nn.Module:
        widths, pad, bottom = _conv_widths(m, img_shape[1])
        convs = [nn.Sequential(nn.Conv2d(a, b, 4, 2, 1), act()) for a, b in zip([img_shape[0], *widths[:-1]], widths)]
        return nn.Sequential(_Pad(pad), *convs, nn.Flatten(), nn.Linear(widths[-1] * bottom * bottom, width), act())


class LadderConvDecoder(LadderDecoder):
    """The mirror of ``LadderConvEncoder``'s first block below z_1."""

    def output_block(self, img_shape: tuple[int, int, int], n_params: int, z_1: int, width: int,
                     act: type[nn.Module], m: ModelConfig) -> nn.Module:
        widths, pad, bottom = _conv_widths(m, img_shape[1])
        rev = widths[::-1]
        ups = [nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1), act()) for a, b in zip(rev[:-1], rev[1:])]
        return nn.Sequential(nn.Linear(z_1, width), act(), nn.Linear(width, rev[0] * bottom * bottom), act(),
                             nn.Unflatten(1, (rev[0], bottom, bottom)), *ups,
                             nn.ConvTranspose2d(widths[0], img_shape[0] * n_params, 4, 2, 1), _Pad(-pad))
