"""The diagonal Gaussian's log-density, the one formula behind the posterior q(z|x), the standard-normal
prior, the Gaussian decoders, the total-correlation estimators and the KL between two diagonal Gaussians
(the ladder's layers, models/ladder.py).

    log N(z; μ, σ²) = −½ [(z − μ)² / σ² + log σ² + log 2π]      per dimension
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)
HALF_LOG_2PI = 0.5 * LOG_2PI


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) per element (the arguments broadcast)."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI)


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return log_normal(z, mu, logvar).sum(-1)


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension (the prior's, and a flow's base density)."""
    return (-0.5 * z.pow(2) - HALF_LOG_2PI).sum(-1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian NLL (B,), summed over pixels, with the std's log ``log_sigma`` (broadcasts against x):
    −log N(x; x̂, σ²) = ½((x − x̂)/σ)² + log σ + ½ log 2π per pixel."""
    nll = 0.5 * (x - mean).pow(2) * torch.exp(-2 * log_sigma) + log_sigma + HALF_LOG_2PI
    return nll.flatten(1).sum(1)


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) per element, in closed form:
    ½ [log σ_p² − log σ_q² + (σ_q² + (μ_q − μ_p)²) / σ_p² − 1]."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1.0)
