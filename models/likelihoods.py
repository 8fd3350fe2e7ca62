"""Decoder likelihoods p(x|z), chosen by ``model.likelihood``.

Every term here is **summed over pixels and channels** and returned per image,
shape (B,); the caller averages over the batch. That is the ELBO in nats per
image. Averaging over pixels instead (the ``mse`` baseline) silently multiplies
the KL weight by the number of pixels D; the σ-VAE paper (Rybkin, Daniilidis &
Levine 2021, "Simple and Effective VAE Training with Calibrated Decoders")
shows that learning one shared σ (``sigma``) or setting it analytically
(``optimal_sigma``) balances the two terms without a hand-tuned β.

Gaussian NLL per pixel, with σ the decoder std:
    -log N(x; x̂, σ²) = 0.5·((x − x̂)/σ)² + log σ + 0.5·log 2π
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from utils.config import ModelConfig

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def softclip_log_sigma(log_sigma: torch.Tensor, floor: float = -6.0) -> torch.Tensor:
    """Smooth lower bound on log σ, ``floor + softplus(log σ − floor)``, as in the σ-VAE reference code.

    Without it a σ-VAE can drive σ → 0 on near-constant pixels (MNIST's black border)
    and the NLL → −∞.
    """
    return floor + F.softplus(log_sigma - floor)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian NLL (B,), summed over pixels; ``log_sigma`` broadcasts against x."""
    nll = 0.5 * (x - mean).pow(2) * torch.exp(-2 * log_sigma) + log_sigma + HALF_LOG_2PI
    return nll.flatten(1).sum(1)


@dataclass
class LikelihoodTerms:
    rec: torch.Tensor        # (B,) the reconstruction term the objective trains on
    nll: torch.Tensor        # (B,) -log p(x|z) in nats: what the ELBO reports
    log_sigma: torch.Tensor | None  # the decoder's log σ (scalar), for logging


class Likelihood(nn.Module):
    """p(x|z) from the decoder's raw output; a new one is a subclass plus a ``LIKELIHOODS`` entry."""

    n_params = 1        # decoder output channels per image channel
    continuous = True   # a density on [0,1] (False: a probability mass, bernoulli)

    @classmethod
    def from_config(cls, m: ModelConfig) -> Likelihood:
        """The likelihood a config asks for; override to read its own ``model.*`` keys."""
        return cls()

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoded image in [0, 1] (the distribution's mean)."""
        return torch.sigmoid(out[:, : out.shape[1] // self.n_params])

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Binary cross-entropy with logits, summed over pixels; data in [0, 1]."""

    continuous = False

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        nll = F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        return LikelihoodTerms(nll, nll, None)


class FixedGaussian(Likelihood):
    """Gaussian with a fixed std ``model.sigma`` (the usual 'Gaussian VAE'; σ=1 by default)."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.register_buffer("log_sigma", torch.tensor(math.log(sigma)), persistent=False)

    @classmethod
    def from_config(cls, m: ModelConfig) -> FixedGaussian:
        return cls(m.sigma)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        nll = gaussian_nll(x, self.mean(out), self.log_sigma)
        return LikelihoodTerms(nll, nll, self.log_sigma)


class AveragedMSE(Likelihood):
    """BASELINE, not a likelihood: per-pixel *averaged* MSE (the σ-VAE paper's mse_vae).

    It trains on mean((x − x̂)²) over pixels while the KL stays summed: the same
    optimum as a Gaussian with σ² = D/2, i.e. a fixed σ of about 20 for MNIST —
    an implicit β of D/2 on a σ=1 Gaussian. Its reported NLL is that implied
    Gaussian's, so the ELBO is honest about what was trained.
    """

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        mean = self.mean(out)
        d = x[0].numel()
        rec = (x - mean).pow(2).flatten(1).mean(1)
        log_sigma = torch.tensor(0.5 * math.log(d / 2), device=x.device)
        return LikelihoodTerms(rec, gaussian_nll(x, mean, log_sigma), log_sigma)


class LearnedSigma(Likelihood):
    """σ-VAE: one learned log σ shared by all pixels, channels and images."""

    def __init__(self):
        super().__init__()
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        log_sigma = softclip_log_sigma(self.log_sigma.float())
        nll = gaussian_nll(x, self.mean(out), log_sigma)
        return LikelihoodTerms(nll, nll, log_sigma)


class OptimalSigma(Likelihood):
    """Optimal σ-VAE: σ² = the batch's mean squared error over all pixels, channels and images.

    σ is the closed-form maximiser of the batch's Gaussian likelihood, so its own
    gradient contribution is zero (envelope theorem) and it is detached. Under
    DDP the squared error and the count are all-reduced first, so σ is the
    global batch's: 2 processes give the same σ as 1. (Every process must call
    this; only loss computations do.)
    """

    fixed_log_sigma: torch.Tensor | None = None  # evaluation: one σ for a whole test set (evaluate.py)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        mean = self.mean(out)
        if self.fixed_log_sigma is not None:
            nll = gaussian_nll(x, mean, self.fixed_log_sigma)
            return LikelihoodTerms(nll, nll, self.fixed_log_sigma)
        sse_n = torch.stack([(x - mean).detach().pow(2).sum(), torch.tensor(float(x.numel()), device=x.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sse_n)
        log_sigma = softclip_log_sigma(0.5 * torch.log(sse_n[0] / sse_n[1]))
        nll = gaussian_nll(x, mean, log_sigma)
        return LikelihoodTerms(nll, nll, log_sigma)


class PerPixelSigma(Likelihood):
    """Naive variant the σ-VAE paper compares against: the decoder outputs a log σ per pixel."""

    n_params = 2

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        mean_logits, raw_log_sigma = out.chunk(2, dim=1)
        log_sigma = softclip_log_sigma(raw_log_sigma)
        nll = gaussian_nll(x, torch.sigmoid(mean_logits), log_sigma)
        return LikelihoodTerms(nll, nll, log_sigma.detach().mean())


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": Bernoulli,
    "gaussian": FixedGaussian,
    "mse": AveragedMSE,
    "sigma": LearnedSigma,
    "optimal_sigma": OptimalSigma,
    "per_pixel_sigma": PerPixelSigma,
}


def build_likelihood(m: ModelConfig) -> Likelihood:
    return LIKELIHOODS[m.likelihood].from_config(m)
