"""Operations on latent codes: interpolation, traversal, per-dimension KL, posterior means, PCA."""

from __future__ import annotations

import torch

from models.vae import VAE
from utils.data.splits import ImageSplit


def interpolate(z0: torch.Tensor, z1: torch.Tensor, steps: int, method: str = "linear") -> torch.Tensor:
    """Codes from z0 to z1, endpoints included: (P, z) pairs -> (P, steps, z).

    ``slerp`` follows the great circle (White 2016, "Sampling generative networks"),
    which keeps intermediate codes at the norm typical of N(0, I) draws; it falls
    back to linear where the two codes are (anti)parallel.
    """
    t = torch.linspace(0, 1, steps, device=z0.device).view(1, steps, 1)
    a, b = z0.unsqueeze(1), z1.unsqueeze(1)
    out = a + t * (b - a)
    if method == "slerp":
        omega = torch.acos(torch.nn.functional.cosine_similarity(z0, z1, dim=1).clamp(-1, 1)).view(-1, 1, 1)
        so = torch.sin(omega)
        safe = so.abs() > 1e-6
        so = torch.where(safe, so, torch.ones_like(so))
        out = torch.where(safe, (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so, out)
    out[:, 0], out[:, -1] = z0, z1  # exact endpoints, whatever the rounding
    return out


def dims_by_kl(kl: torch.Tensor, n: int = 0) -> list[int]:
    """Latent dimensions ordered by their mean KL, most informative first; the first ``n`` (0: all)."""
    order = torch.argsort(kl, descending=True).tolist()
    return order[:n] if n else order


def traversal_codes(base: torch.Tensor, dims: list[int], values: torch.Tensor) -> torch.Tensor:
    """Row r varies only coordinate dims[r] of ``base`` (z,) over ``values`` (V,): (len(dims), V, z)."""
    codes = base.view(1, 1, -1).repeat(len(dims), len(values), 1)
    for r, d in enumerate(dims):
        codes[r, :, d] = values
    return codes


@torch.no_grad()
def encode_with_kl(model: VAE, x: torch.Tensor,
                   y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    """(posterior means (B, z), KL per image and latent dimension (B, z), in fp32, and a ladder's bottom-up terms of
    its lower layers, which ``decode_layers`` takes (None for one layer)): what ranks, counts and plots the
    dimensions (the prior's own KL per dimension where it has one, else each dimension's to N(0, 1))."""
    mu, logvar, below = model.encode_layers(x, y)
    mu, logvar = mu.float(), logvar.float()
    return mu, model.prior.dimension_kl(mu, logvar), below


@torch.no_grad()
def layer_kl(model: VAE, data: ImageSplit, layer: int, batch_size: int = 500, limit: int = 0,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """The mean KL per dimension (z_l,) of q(z_l | z_l+1, x) to p(z_l | z_l+1) for a Ladder VAE's 0-based ``layer``
    below the top, over the first ``limit`` images (0: all), the layers above at their posterior means."""
    n = len(data) if limit <= 0 else min(limit, len(data))
    kl_sum = 0.0
    for start in range(0, n, batch_size):
        mu, _, below = model.encode_layers(data.batch(torch.arange(start, min(start + batch_size, n))).to(device))
        kl_sum = kl_sum + model.decoder.layer_posteriors(mu.float(), below)[layer][2].sum(0)
    return kl_sum / n


@torch.no_grad()
def posterior_stats(model: VAE, data: ImageSplit, batch_size: int = 500, limit: int = 0,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior means (N, z), mean KL per latent dimension (z,)) over the first ``limit`` images (0: all)."""
    n = len(data) if limit <= 0 else min(limit, len(data))
    means, kl_sum = [], torch.zeros(model.z_dim, device=device)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        mu, kl, _ = encode_with_kl(model, data.batch(idx).to(device), data.labels_at(idx.to(device)))
        means.append(mu)
        kl_sum += kl.sum(0)
    return torch.cat(means), kl_sum / n


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project rows of x (N, d) on their first two principal components: (N, 2), explained variance ratios (2,)."""
    centred = x - x.mean(0, keepdim=True)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    var = s.pow(2)
    return centred @ v[:2].T, var[:2] / var.sum()
