"""FID between a VAE's samples and held-out images, through torchmetrics' FrechetInceptionDistance.

The standard Inception-v3 weights (torch-fidelity's ``pt_inception-2015-12-05``)
are fetched on first use and cached by torch hub; on a machine without internet
pass them with ``--fid_weights PATH``, or pass any other feature extractor as a
``torch.export`` program (.pt2) or TorchScript module with ``--fid_features PATH``
(its FID is then comparable only with itself). Like any model file, an
extractor is code: use your own or a trusted one. Grey images are repeated to three channels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.vae import VAE
from utils.data import Images
from utils.errors import UserError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


def build_fid(weights: str | None = None, features: str | None = None, device: torch.device | str = "cpu"):
    """A FrechetInceptionDistance on ``device``, or a one-line error saying how to supply the extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if features:
        if not Path(features).is_file():
            raise UserError(f"--fid_features {features} not found: pass a TorchScript feature extractor file")
        try:
            if features.endswith(".pt2"):  # torch.export, the successor of TorchScript
                module = torch.export.load(features).module()
            else:
                module = torch.jit.load(features, map_location=device).eval()
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"--fid_features {features} is not an exported (.pt2) or TorchScript module "
                            f"({str(e).splitlines()[0]}): save one with torch.export.save(torch.export.export("
                            f"model, (example,)), 'features.pt2')") from None
        return FrechetInceptionDistance(feature=module, normalize=True).to(device)
    if weights and not Path(weights).is_file():
        raise UserError(f"--fid_weights {weights} not found: pass the file {INCEPTION_FILE}")
    try:
        return FrechetInceptionDistance(feature=2048, normalize=True,
                                        feature_extractor_weights_path=weights).to(device)
    except (OSError, RuntimeError, ValueError) as e:  # urllib errors are OSErrors: no internet
        raise UserError(f"FID needs the Inception weights {INCEPTION_FILE}, which could not be loaded "
                        f"({e.__class__.__name__}): download it once (torch-fidelity's release page) and pass "
                        f"--fid_weights PATH, or pass another extractor with --fid_features PATH") from None


@torch.no_grad()
def fid_score(vae: VAE, data: Images, metric, n: int, batch_size: int, device: torch.device | str,
              rank: int = 0, world: int = 1, seed: int = 0, progress=None) -> float:
    """FID between n prior samples and the first n held-out images (each process takes every world-th batch)."""
    n = min(n, len(data))
    g = torch.Generator().manual_seed(seed + rank)

    def three(x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    for b, start in enumerate(range(0, n, batch_size)):
        if b % world != rank:
            continue
        idx = torch.arange(start, min(start + batch_size, n), device=device)
        metric.update(three(data.batch(idx).to(device)).clamp(0, 1), real=True)
        z = torch.randn(len(idx), vae.z_dim, generator=g).to(device)
        metric.update(three(vae.decode(z)).clamp(0, 1), real=False)
        if progress is not None:
            progress.update(len(idx) * world)
    return float(metric.compute())
