"""The diagonal Gaussian's log-density, the one formula behind the posterior q(z|x), the standard-normal
prior, the Gaussian decoders and the total-correlation estimators.

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


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian NLL (B,), summed over pixels, with the std's log ``log_sigma`` (broadcasts against x):
    −log N(x; x̂, σ²) = ½((x − x̂)/σ)² + log σ + ½ log 2π per pixel."""
    nll = 0.5 * (x - mean).pow(2) * torch.exp(-2 * log_sigma) + log_sigma + HALF_LOG_2PI
    return nll.flatten(1).sum(1)
