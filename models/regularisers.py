"""Latent regularisers: analytic KL to N(0, I) and the MMD of InfoVAE / MMD-VAE."""

from __future__ import annotations

import torch

IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per image and latent dimension, (B, z).

    Kingma & Welling 2014, appendix B: -KL = 0.5 · Σ_j (1 + log σ_j² − μ_j² − σ_j²).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The KL per image (B,), summed over latent dimensions."""
    return kl_per_dim(mu, logvar).sum(1)


def _kernel(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """k(a_i, b_j) for all pairs, (n, m). Bandwidths are set for a N(0, I) prior in d dimensions."""
    d2 = torch.cdist(a, b).pow(2)
    d = a.shape[1]
    if kind == "rbf":
        return torch.exp(-d2 / (2.0 * d))
    # inverse multiquadric, summed over scales as in WAE (Tolstikhin et al. 2018): C / (C + ||a − b||²)
    return sum((2.0 * d * s) / (2.0 * d * s + d2) for s in IMQ_SCALES)


def mmd(z: torch.Tensor, prior: torch.Tensor, kind: str = "imq") -> torch.Tensor:
    """Unbiased estimate of MMD²(q(z), p(z)) from samples z ~ q(z) and prior ~ N(0, I), both (n, d).

    Zhao, Song & Ermon 2019 (InfoVAE): replace or complement the KL with a
    divergence between the *aggregate* posterior and the prior.
    """
    n = z.shape[0]
    off = 1.0 - torch.eye(n, device=z.device, dtype=z.dtype)
    k_zz = (_kernel(z, z, kind) * off).sum() / (n * (n - 1))
    k_pp = (_kernel(prior, prior, kind) * off).sum() / (n * (n - 1))
    k_zp = _kernel(z, prior, kind).mean()
    return k_zz + k_pp - 2.0 * k_zp
