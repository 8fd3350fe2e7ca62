"""FID between a VAE's samples and held-out images, through torchmetrics' FrechetInceptionDistance.

The standard Inception-v3 weights (torch-fidelity's ``pt_inception-2015-12-05``)
are fetched on first use and cached by torch hub; on a machine without internet
pass them with ``--fid_weights PATH``. torch-fidelity reads that file with
``torch.load(weights_only=False)``, which would run any code pickled into it, so the
file is first read here with ``weights_only=True`` (tensors only; anything else is
refused) and only those verified bytes are handed on. Another feature extractor can
be passed from Python as a module (``build_fid(features=module)``); model files that
are code (TorchScript, torch.export) are not loaded. Grey images are repeated to three channels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from models.vae import VAE
from utils.data.splits import ImageSplit
from utils.errors import UserError, torch_weights
from utils.evaluation.sample_quality import image_pairs, sampled

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


def verified_weights(path: str) -> bytes:
    """The bytes of a torch weights file, once ``torch.load(weights_only=True)`` has accepted them."""
    return torch_weights(path, "--fid_weights", INCEPTION_FILE)[0]


def build_fid(weights: str | None = None, features: torch.nn.Module | None = None,
              device: torch.device | str = "cpu"):
    """A FrechetInceptionDistance on ``device``, or a one-line error saying how to supply the extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if features is not None:  # any module mapping (B, 3, H, W) in [0, 1] to (B, d) features
        return FrechetInceptionDistance(feature=features, normalize=True).to(device)
    try:
        if weights is None:
            return FrechetInceptionDistance(feature=2048, normalize=True).to(device)
        with tempfile.TemporaryDirectory() as tmp:
            checked = Path(tmp) / INCEPTION_FILE
            checked.write_bytes(verified_weights(weights))
            return FrechetInceptionDistance(feature=2048, normalize=True,
                                            feature_extractor_weights_path=str(checked)).to(device)
    except (OSError, RuntimeError, ValueError) as e:  # urllib errors are OSErrors: no internet
        raise UserError(f"FID needs the Inception weights {INCEPTION_FILE}, which could not be loaded "
                        f"({e.__class__.__name__}): download it once (torch-fidelity's release page) and pass "
                        f"--fid_weights PATH") from None


@torch.no_grad()
def fid_score(vae: VAE, data: ImageSplit, metric, n: int, batch_size: int, device: torch.device | str,
              rank: int = 0, world: int = 1, seed: int = 0, progress=None, draw=None) -> float:
    """FID between n samples and the first n held-out images (each process takes every world-th batch); codes
    from ``draw(n, generator)`` (an ex-post sampler's), else from the prior."""
    def three(x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    generate = sampled(vae, draw or vae.prior.sample)  # a conditional model: the held-out images' classes
    g = torch.Generator().manual_seed(seed + rank)
    for real, fake in image_pairs(data, min(n, len(data)), batch_size, device, generate, g, rank, world, progress):
        metric.update(three(real), real=True)
        metric.update(three(fake), real=False)
    return float(metric.compute())
