"""A KL autoencoder with spatial latents, Stable Diffusion's first stage (Rombach et al. 2022): diffusers' own
``Encoder`` and ``Decoder`` with ``AutoencoderKL``'s ``quant_conv`` and ``post_quant_conv``, so that a trained
model's tensors map one to one onto an ``AutoencoderKL`` (``diffusers_state``) and diffusers decodes its latents
to the same images.

The latents are a map C x H/f x W/f (C = ``model.latent_channels``, f = 2^(blocks - 1): every down block but
the last halves the image). The toolkit's priors, bounds and samplers take flat codes, so the encoder returns the
map flattened, (B, C·h·w), and the decoder un-flattens it; ``model.z_dim`` must equal C·h·w.

Images: the toolkit's are in [0, 1] and its decoded image is ``sigmoid(out)``; diffusers' are in [-1, 1] and a
pipeline shows ``(d / 2 + 0.5).clamp(0, 1)``. The encoder reads 2x - 1; the decoder returns logits whose sigmoid
is that clamp (``to_logits``). diffusers is imported only when a network is built, so the command lines answer
--help and config errors without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from utils.errors import UserError

if TYPE_CHECKING:
    from models.config import ModelConfig

# the clamp's margin inside (0, 1): within 1e-5 of diffusers' 0 and 1, and a power of 2, so that 1 - EPS is exact
# in float32 and sigmoid's gradient there, s(1 - s), is within 2% (float32's spacing near 1 is 2^-24)
EPS = 2.0 ** -18
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' weights file in a model folder
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to it


def latent_shape(m: ModelConfig, img_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, h, w) of the latent map of ``img_shape`` (C, H, W) images, after every check that diffusers' blocks
    pose: channels divisible by the norm's groups, the image by the down-sampling factor, z_dim = C·h·w."""
    blocks = m.block_channels
    if not blocks or min(blocks) < 1 or max(blocks) > 4096 or len(blocks) > 8:
        raise UserError(f"model.block_channels={blocks} needs one width of 1 to 4096 per block, at most 8 blocks, "
                        f"e.g. [128, 256, 512]")
    odd = [b for b in blocks if b % m.norm_groups]
    if odd:
        raise UserError(f"model.block_channels={blocks}: {odd} not divisible by model.norm_groups={m.norm_groups} "
                        f"(diffusers' group norm): use multiples of it, or another norm_groups")
    f = 2 ** (len(blocks) - 1)
    _, height, width = img_shape
    if height % f or width % f:
        raise UserError(f"{height}x{width} images do not divide by the latents' factor f={f} ({len(blocks)} blocks "
                        f"of model.block_channels): set data.img_size to a multiple of {f}, or use fewer blocks")
    shape = (m.latent_channels, height // f, width // f)
    if m.z_dim != math.prod(shape):
        raise UserError(f"model.z_dim={m.z_dim}, but model.net={m.net} has latents {'x'.join(map(str, shape))} = "
                        f"{math.prod(shape)} values: set model.z_dim={math.prod(shape)}")
    return shape


def diffusers_config(m: ModelConfig, img_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of these networks (its shape keys; the scaling factor is the exporter's)."""
    n = len(m.block_channels)
    return {"in_channels": img_shape[0], "out_channels": img_shape[0], "latent_channels": m.latent_channels,
            "block_out_channels": list(m.block_channels), "layers_per_block": m.layers_per_block,
            "norm_num_groups": m.norm_groups, "act_fn": "silu", "sample_size": img_shape[1],
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


def to_logits(d: torch.Tensor) -> torch.Tensor:
    """Logits whose sigmoid is diffusers' shown image (d / 2 + 0.5).clamp(0, 1), within EPS, in fp32.

    A plain clamp would give no gradient to a pixel outside [0, 1] (d beyond ±1), so a decoder that overshoots
    could never be pulled back. Here the clamp is straight-through: its value is the clamp's, its gradient the
    identity's. With logit's derivative 1 / (p(1 - p)) and sigmoid's p(1 - p) cancelling, the decoded image's
    gradient with respect to d is 1/2 everywhere (p and 1 - p are each computed from d, so that neither is
    rounded near the other end), so a Gaussian likelihood (σ-VAE, optimal σ) pulls an
    overshooting pixel back at the same rate as any other. (A Bernoulli likelihood's gradient, in the logits,
    grows as 1 / p near the clamp's ends, as that likelihood's does at any p.)"""
    d = d.float()
    p, q = (1 + d) / 2, (1 - d) / 2  # the image and 1 - it, each from d: no rounding of 1 - p near p = 1
    p, q = (t + (t.clamp(EPS, 1 - EPS) - t).detach() for t in (p, q))
    return torch.log(p) - torch.log(q)


class KLAEncoder(nn.Module):
    """diffusers' ``Encoder`` (``DownEncoderBlock2D`` blocks of ``model.layers_per_block`` ResNet blocks with
    group norm, a mid block with attention) and ``AutoencoderKL``'s ``quant_conv``: (mu, logvar), each the latent
    map flattened, logvar clamped to diffusers' range."""

    convolutional = True  # faster on channels-last images

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, m: ModelConfig, n_cond: int = 0):
        super().__init__()
        if n_cond:
            raise UserError(f"model.net={m.net} has no conditional form (an AutoencoderKL reads no label): set "
                            f"model.conditional=false")
        from diffusers.models.autoencoders.vae import Encoder

        self.shape = latent_shape(m, img_shape)
        n = len(m.block_channels)
        self.encoder = Encoder(in_channels=img_shape[0], out_channels=m.latent_channels,
                               down_block_types=("DownEncoderBlock2D",) * n, block_out_channels=tuple(m.block_channels),
                               layers_per_block=m.layers_per_block, act_fn="silu", norm_num_groups=m.norm_groups,
                               double_z=True)
        self.quant_conv = nn.Conv2d(2 * m.latent_channels, 2 * m.latent_channels, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.quant_conv(self.encoder(2 * x - 1)).chunk(2, dim=1)  # (B, C, h, w) each
        return mu.flatten(1), logvar.clamp(*LOGVAR_RANGE).flatten(1)


class KLADecoder(nn.Module):
    """``AutoencoderKL``'s ``post_quant_conv`` and diffusers' ``Decoder``, the encoder's mirror; its output is
    the logits of diffusers' shown image (``to_logits``)."""

    diffusers_class = "AutoencoderKL"  # the diffusers model these networks are (the exporter writes its folder)

    def __init__(self, img_shape: tuple[int, int, int], z_dim: int, n_params: int, m: ModelConfig):
        super().__init__()
        if n_params != 1:
            raise UserError(f"model.net={m.net} decodes one value per pixel, as an AutoencoderKL does, and "
                            f"model.likelihood={m.likelihood} needs {n_params}: use a likelihood with one "
                            f"(optimal_sigma, sigma, gaussian, bernoulli, ...)")
        from diffusers.models.autoencoders.vae import Decoder

        self.shape = latent_shape(m, img_shape)
        n = len(m.block_channels)
        self.post_quant_conv = nn.Conv2d(m.latent_channels, m.latent_channels, 1)
        self.decoder = Decoder(in_channels=m.latent_channels, out_channels=img_shape[0],
                               up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(m.block_channels),
                               layers_per_block=m.layers_per_block, norm_num_groups=m.norm_groups, act_fn="silu")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return to_logits(self.decoder(self.post_quant_conv(z.view(-1, *self.shape))))

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight of diffusers' ``conv_out``, which makes the image: where the discriminator's adaptive weight
        is balanced (as latent-diffusion's ``get_last_layer``)."""
        return self.decoder.conv_out.weight

    def init_from(self, encoder: nn.Module, folder: str, m: ModelConfig, img_shape: tuple[int, int, int]) -> None:
        """Load an ``AutoencoderKL`` folder's weights into ``encoder`` and this decoder, after checking its
        config.json against the config's shape keys (a mismatch names both)."""
        load_autoencoder_kl(encoder, self, Path(folder), m, img_shape)


def diffusers_state(encoder_state: dict[str, torch.Tensor],
                    decoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The networks' tensors under ``AutoencoderKL``'s names: the encoder's ``encoder.*`` and ``quant_conv.*``
    and the decoder's ``decoder.*`` and ``post_quant_conv.*`` are those of the modules of the same names."""
    return {**encoder_state, **decoder_state}


def read_folder_config(folder: Path) -> dict[str, Any]:
    """An ``AutoencoderKL`` folder's config.json, or a one-line refusal."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"model.init_from={folder} is not a folder: pass a diffusers AutoencoderKL folder "
                        f"(config.json + {WEIGHTS})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e.__class__.__name__}): model.init_from needs a diffusers "
                        f"AutoencoderKL folder (config.json + {WEIGHTS})") from None
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        kind = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise UserError(f"{path} describes a {kind}, not an AutoencoderKL: pass an AutoencoderKL folder")
    return config


def check_folder_config(config: dict[str, Any], m: ModelConfig, img_shape: tuple[int, int, int],
                        path: Path) -> None:
    """Refuse a folder whose networks differ from the config's, naming the key on both sides."""
    ours = diffusers_config(m, img_shape)
    names = {"in_channels": "the data's channels", "out_channels": "the data's channels",
             "latent_channels": "model.latent_channels", "block_out_channels": "model.block_channels",
             "layers_per_block": "model.layers_per_block", "norm_num_groups": "model.norm_groups"}
    defaults = {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
                "act_fn": "silu", "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4,
                "in_channels": 3, "out_channels": 3, "block_out_channels": [64],
                "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}
    for key, value in ours.items():
        if key == "sample_size":  # (the size it was trained at; the networks take any multiple of f)
            continue
        theirs = config.get(key, defaults.get(key))
        if isinstance(theirs, tuple):
            theirs = list(theirs)
        if theirs != value:
            ours_name = names.get(key, f"model.net={m.net}'s {key}")
            raise UserError(f"{path} has {key}={theirs} and the config {ours_name} gives {value}: set the config "
                            f"to the folder's ({key}={theirs}), or pass another model.init_from")


def load_autoencoder_kl(encoder: nn.Module, decoder: nn.Module, folder: Path, m: ModelConfig,
                        img_shape: tuple[int, int, int]) -> None:
    """Fill the networks from an ``AutoencoderKL`` folder (config.json checked, every tensor's name and shape
    checked before any is copied)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_folder_config(read_folder_config(folder), m, img_shape, folder / "config.json")
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{folder / WEIGHTS} cannot be read as safetensors ({e.__class__.__name__}): pass an "
                        f"AutoencoderKL folder saved with safetensors weights") from None
    ours = diffusers_state(encoder.state_dict(), decoder.state_dict())
    wrong = sorted(k for k in ours.keys() | state.keys()
                   if k not in ours or k not in state or ours[k].shape != state[k].shape)
    if wrong:
        raise UserError(f"{folder / WEIGHTS} does not fit the config's networks ({len(wrong)} tensors missing, "
                        f"extra or of another shape, e.g. {wrong[0]}): pass the folder its config.json describes")
    for net in (encoder, decoder):
        net.load_state_dict({k: state[k] for k in net.state_dict()})
