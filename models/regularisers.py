"""Latent regularisers, chosen by ``loss.regulariser``: the term the objective adds to the reconstruction.

    kl    β_t · KL(q(z|x) || p(z))                          VAE (β = 1), β-VAE (Higgins et al. 2017)
    mmd   β_t · KL(q(z|x) || p(z)) + λ · MMD(q(z) || p(z))   InfoVAE (Zhao et al. 2019); β = 0 is the MMD-VAE

β_t is ``loss.beta`` after the linear warm-up of ``loss.kl_warmup_steps``. The
objective hands each regulariser the per-image KL it already computed (closed
form where the prior has one, else a Monte Carlo estimate), the sampled codes and
the prior, so a new regulariser is one class and one ``REGULARISERS`` entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from models.priors import Prior

if TYPE_CHECKING:
    from utils.config import LossConfig

IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def imq_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inverse multiquadric C / (C + ||a − b||²), summed over the scales of WAE (Tolstikhin et al. 2018),
    C = 2·d·s: bandwidths set for a N(0, I) prior in d dimensions. (n, m) for a (n, d), b (m, d)."""
    d2 = torch.cdist(a, b).pow(2)
    d = a.shape[1]
    return sum((2.0 * d * s) / (2.0 * d * s + d2) for s in IMQ_SCALES)


def rbf_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(−||a − b||² / 2d), (n, m)."""
    return torch.exp(-torch.cdist(a, b).pow(2) / (2.0 * a.shape[1]))


KERNELS = {"imq": imq_kernel, "rbf": rbf_kernel}


def mmd(z: torch.Tensor, prior: torch.Tensor, kind: str = "imq") -> torch.Tensor:
    """Unbiased estimate of MMD²(q(z), p(z)) from samples z ~ q(z) and prior ~ p(z), both (n, d).

    Zhao, Song & Ermon 2019 (InfoVAE): a divergence between the *aggregate*
    posterior and the prior, where the KL compares each image's posterior.
    """
    kernel, n = KERNELS[kind], z.shape[0]
    off = 1.0 - torch.eye(n, device=z.device, dtype=z.dtype)
    k_zz = (kernel(z, z) * off).sum() / (n * (n - 1))
    k_pp = (kernel(prior, prior) * off).sum() / (n * (n - 1))
    return k_zz + k_pp - 2.0 * kernel(z, prior).mean()


class Regulariser(nn.Module):
    """β_t · KL, plus whatever a subclass adds. Returns (the batch's penalty, extra terms to log)."""

    def __init__(self, loss: LossConfig):
        super().__init__()
        self.beta, self.warmup = loss.beta, loss.kl_warmup_steps

    @classmethod
    def from_config(cls, loss: LossConfig) -> Regulariser:
        return cls(loss)

    def kl_weight(self, step: int | None) -> float:
        """β_t: linear warm-up from 0 to β; ``None`` (evaluation) means fully warmed up."""
        if step is None or self.warmup <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.warmup)

    def forward(self, kl: torch.Tensor, z: torch.Tensor, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.kl_weight(step) * kl.mean(), {}


class KL(Regulariser):
    """β_t · KL(q(z|x) || p(z)) per image, averaged over the batch."""


class MMD(Regulariser):
    """β_t · KL + ``loss.mmd_weight`` · MMD(q(z) || p(z)) with ``loss.mmd_kernel``, codes z against prior draws."""

    def __init__(self, loss: LossConfig):
        super().__init__(loss)
        self.weight, self.kernel = loss.mmd_weight, loss.mmd_kernel

    def forward(self, kl: torch.Tensor, z: torch.Tensor, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, _ = super().forward(kl, z, prior, step)
        value = mmd(z, prior.sample(len(z), device=z.device).to(z.dtype), self.kernel)
        return penalty + self.weight * value, {"mmd": value}


REGULARISERS: dict[str, type[Regulariser]] = {
    "kl": KL,
    "mmd": MMD,
}


def build_regulariser(loss: LossConfig) -> Regulariser:
    return REGULARISERS[loss.regulariser].from_config(loss)
