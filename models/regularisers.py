"""Latent regularisers, chosen by ``loss.regulariser``: the term the objective adds to the reconstruction.

    kl      β_t · KL(q(z|x) || p(z))                          VAE (β = 1), β-VAE (Higgins et al. 2017)
    none    nothing                                            with loss.objective=ae, the plain autoencoder
    mmd     β_t · KL(q(z|x) || p(z)) + λ · MMD(q(z) || p(z))   InfoVAE (Zhao et al. 2019); β = 0 is the MMD-VAE
    tcvae      w_t · (KL + (β − 1) · TC)                        β-TCVAE (Chen et al. 2018)
    factorvae  β_t · KL + γ · TC, TC from a critic network         FactorVAE (Kim & Mnih 2018)
    dip_i   β_t · KL + λ_od Σ_i≠j C_ij² + λ_d Σ_i (C_ii − 1)²   DIP-VAE-I (Kumar et al. 2018), C = Cov[E[z|x]]
    dip_ii  as dip_i with C = Cov_q(z)[z]                       DIP-VAE-II
    aae     β_t · KL + λ · the encoder's adversarial loss         AAE (Makhzani et al. 2016), with loss.objective=ae

β_t is ``loss.beta`` after the linear warm-up of ``loss.kl_warmup_steps``. The
objective hands each regulariser the per-image KL it already computed (closed
form where the prior has one, else a Monte Carlo estimate), the sampled codes with
their posterior's parameters, and the prior, so a new regulariser is one class here, its rules class (what
it states for the config, without torch) and one ``REGULARISERS`` entry, both in regulariser_rules.py. A
regulariser with a network of its own (FactorVAE's critic, the AAE's discriminator: adversarial.py) lists it
in ``auxiliary_parameters`` (kept out of the VAE's optimizer), trains it in ``after_step`` and hands its
optimizer's state to checkpoints. The base class is in regulariser_base.py, β-TCVAE in total_correlation.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.adversarial import Adversarial, Critic, FactorVAE, discriminator_losses, permute_dims
from models.priors import Prior
from models.regulariser_base import PosteriorSample, Regulariser
from models.regulariser_rules import REGULARISERS, DIPIIRules, DIPRules, KLRules, MMDRules, NoRegulariserRules
from models.total_correlation import TC_ESTIMATORS, TCVAE, log_importance_weights, log_q_matrix, tc_parts

__all__ = ["KERNELS", "REGULARISERS", "TC_ESTIMATORS", "TCVAE", "Adversarial", "Critic", "FactorVAE",
           "PosteriorSample", "Regulariser", "discriminator_losses", "log_importance_weights", "log_q_matrix", "mmd",
           "permute_dims", "tc_parts"]

if TYPE_CHECKING:
    from models.config import LossConfig

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


class KL(KLRules, Regulariser):
    """β_t · KL(q(z|x) || p(z)) per image, averaged over the batch."""


class NoRegulariser(NoRegulariserRules, Regulariser):
    """No latent term at all: with ``loss.objective=ae``, the plain autoencoder; with the ELBO, a VAE without
    its KL (β = 0)."""

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.zeros((), device=codes.z.device), {}


class MMD(MMDRules, Regulariser):
    """β_t · KL + ``loss.mmd_weight`` · MMD(q(z) || p(z)) with ``loss.mmd_kernel``, codes z against prior draws."""

    def __init__(self, loss: LossConfig):
        super().__init__(loss)
        self.weight, self.kernel = loss.mmd_weight, loss.mmd_kernel

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, _ = super().forward(kl, codes, prior, step)
        z = codes.z
        value = mmd(z, prior.sample(len(z), device=z.device).to(z.dtype), self.kernel)
        return penalty + self.weight * value, {"mmd": value}


def covariance(x: torch.Tensor) -> torch.Tensor:
    """E[x xᵀ] − E[x] E[x]ᵀ over the batch (the biased estimate, as disentanglement_lib), (d, d) for x (B, d)."""
    centred = x - x.mean(0)
    return centred.T @ centred / len(x)


class DIP(DIPRules, Regulariser):
    """β_t · KL + λ_od · Σ_i≠j C_ij² + λ_d · Σ_i (C_ii − 1)² (Kumar et al. 2018): pushes a covariance of the
    codes towards the identity, the prior's. DIP-VAE-I takes C = Cov[E_q[z|x]] (the means' covariance),
    DIP-VAE-II C = Cov_q(z)[z] = E[Σ(x)] + Cov[E_q[z|x]]; both over the batch, as disentanglement_lib."""

    second_moment = False

    def __init__(self, loss: LossConfig):
        super().__init__(loss)
        self.lambda_od, self.lambda_d = loss.dip_lambda_od, loss.dip_lambda_d

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, _ = super().forward(kl, codes, prior, step)
        c = covariance(codes.mu)
        if self.second_moment:
            c = c + torch.diag(codes.logvar.exp().mean(0))
        diag = torch.diagonal(c)
        off = (c.pow(2).sum() - diag.pow(2).sum())
        on = (diag - 1).pow(2).sum()
        return penalty + self.lambda_od * off + self.lambda_d * on, {"dip_off_diagonal": off, "dip_diagonal": on}


class DIPII(DIPIIRules, DIP):
    """DIP-VAE-II: the aggregate posterior's covariance."""

    second_moment = True


def build_regulariser(loss: LossConfig, z_dim: int) -> Regulariser:
    return REGULARISERS[loss.regulariser].load().from_config(loss, z_dim)
