"""Priors p(z), chosen by ``model.prior``.

Training, ``evaluate.py`` and ``sample.py`` all ask the model's one prior object
for log p(z) and for samples, so a prior other than the standard normal (a
mixture of learned pseudo-input posteriors, say) is used consistently by the
objective, the likelihood bounds and the sample grids. A prior with a closed-form
KL to a diagonal Gaussian posterior returns it from ``kl_per_dim``; any other
returns None, and the objective then estimates the KL by Monte Carlo,
log q(z|x) − log p(z) at the sampled z.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from utils.config import ModelConfig

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Prior(nn.Module):
    """p(z) over codes of size ``z_dim``."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim

    @classmethod
    def from_config(cls, m: ModelConfig) -> Prior:
        return cls(m.z_dim)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) per code, (...,) for z (..., z_dim)."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """n codes (n, z_dim) on ``device`` (default: the generator's, else the CPU), from ``generator`` or the
        device's default one."""
        raise NotImplementedError

    def kl_per_dim(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor | None:
        """KL(q(z|x) || p(z)) per image and dimension (B, z) in closed form, or None where there is none."""
        return None


class StandardNormal(Prior):
    """N(0, I), the prior of Kingma & Welling (2014)."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return (-0.5 * z.pow(2) - HALF_LOG_2PI).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        if device is None and generator is not None:
            device = generator.device
        return torch.randn(n, self.z_dim, generator=generator, device=device)

    def kl_per_dim(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Kingma & Welling 2014, appendix B: −KL = 0.5 · Σ_j (1 + log σ_j² − μ_j² − σ_j²)."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


PRIORS: dict[str, type[Prior]] = {
    "normal": StandardNormal,
}


def build_prior(m: ModelConfig) -> Prior:
    return PRIORS[m.prior].from_config(m)
