"""The diffusers form of a KL autoencoder (``model.net=klae``): a folder ``AutoencoderKL.from_pretrained`` loads.

The exporter writes it as the ``vae/`` subfolder of the Hub layout (where a diffusers pipeline keeps its
autoencoder: ``AutoencoderKL.from_pretrained(OUT, subfolder="vae")``): ``config.json`` and
``diffusion_pytorch_model.safetensors``, the networks' tensors under ``AutoencoderKL``'s names. No diffusers
import is needed to write it.

``scaling_factor`` is latent-diffusion's 1 / std of the latents z ~ q(z|x) (Rombach et al. 2022, their
``scale_by_std``: ``1 / z.flatten().std()``), over every element of every latent of the whole training split
rather than their first batch. The std is that of the posterior's samples in expectation, computed without
drawing them by the law of total variance, Var z = Var mu + E σ², so it is the same for any seed.
``shift_factor`` (only when asked) is the mean of those samples, E mu: diffusers' pipelines then use
(z - shift_factor) · scaling_factor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.klae import WEIGHTS, diffusers_config, diffusers_state
from models.vae import VAE
from utils.data.splits import ImageSplit
from utils.files import save_tensors

if TYPE_CHECKING:
    from utils.inference.trained import TrainedVAE

FOLDER = "vae"  # the subfolder of the export, as in a diffusers pipeline's folder


def has_diffusers_form(vae: VAE) -> bool:
    """Whether the networks are an ``AutoencoderKL``'s (the decoder states its class)."""
    return getattr(vae.decoder, "diffusers_class", None) is not None


@torch.no_grad()
def latent_statistics(vae: VAE, train: ImageSplit, batch_size: int = 256) -> tuple[float, float, int]:
    """(mean, std, images) of the posterior's samples over every latent element of the ``train`` images, in
    float64 sums: mean = E mu, std² = E mu² - (E mu)² + E exp(logvar)."""
    total = squares = variances = 0.0
    elements = 0
    for start in range(0, len(train), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(train)))
        mu, logvar = vae.encode(train.batch(idx).to(vae.device))
        mu, logvar = mu.double(), logvar.double()
        total += mu.sum().item()
        squares += mu.square().sum().item()
        variances += logvar.exp().sum().item()
        elements += mu.numel()
    mean = total / elements
    return mean, math.sqrt(max(squares / elements - mean * mean, 0.0) + variances / elements), len(train)


def diffusers_folder(vae: TrainedVAE, folder: Path, scaling_factor: float, shift_factor: float | None) -> None:
    """``AutoencoderKL``'s config.json and weights in the new ``folder``."""
    folder.mkdir()
    config = {"_class_name": vae.decoder.diffusers_class, "_diffusers_version": diffusers_version(),
              **diffusers_config(vae.config.model, vae.img_shape), "scaling_factor": scaling_factor,
              "shift_factor": shift_factor, "force_upcast": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = diffusers_state(vae.encoder.state_dict(), vae.decoder.state_dict())
    save_tensors({k: v.detach().float().contiguous() for k, v in state.items()}, folder / WEIGHTS,
                 metadata={"format": "pt"})


def diffusers_version() -> str:
    """The installed diffusers' version (building the networks needed it), read without importing it."""
    from importlib.metadata import version

    return version("diffusers")
