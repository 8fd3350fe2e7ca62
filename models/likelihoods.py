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
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from models.gaussian import gaussian_nll

if TYPE_CHECKING:
    from models.config import ModelConfig


def softclip_log_sigma(log_sigma: torch.Tensor, floor: float = -6.0) -> torch.Tensor:
    """Smooth lower bound on log σ, ``floor + softplus(log σ − floor)``, as in the σ-VAE reference code.

    Without it a σ-VAE can drive σ → 0 on near-constant pixels (MNIST's black border)
    and the NLL → −∞.
    """
    return floor + F.softplus(log_sigma - floor)


@dataclass
class LikelihoodTerms:
    rec: torch.Tensor        # (B,) the reconstruction term the objective trains on
    nll: torch.Tensor        # (B,) -log p(x|z) in nats: what the ELBO reports
    log_sigma: torch.Tensor | None  # the decoder's log σ (scalar), for logging


class Likelihood(nn.Module):
    """p(x|z) from the decoder's raw output; a new one is a subclass plus a ``LIKELIHOODS`` entry."""

    n_params = 1        # decoder output channels per image channel
    continuous = True   # a density on [0,1] (False: a probability mass, bernoulli)
    sigma_from_batch = False  # σ is the batch's own: evaluation fixes one σ for the whole held-out set instead

    @classmethod
    def from_config(cls, m: ModelConfig, batch_size: int) -> Likelihood:
        """The likelihood the ``model`` section asks for; override to read its own keys (``model.sigma``, say).
        ``batch_size`` is the global training batch, which a batch-averaged baseline's implied σ depends on."""
        return cls()

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoded image in [0, 1] (the distribution's mean)."""
        return torch.sigmoid(out[:, : out.shape[1] // self.n_params])

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        raise NotImplementedError

    def terms_k(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        """The terms of k decoder outputs per image, out (k·B, ...) sample-major, for images x (B, ...): those
        of ``forward`` on the images repeated k times. A likelihood may avoid that k-fold copy."""
        k = len(out) // len(x)
        return self(x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1), out)


class Bernoulli(Likelihood):
    """Binary cross-entropy with logits, summed over pixels; data in [0, 1]."""

    continuous = False

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        nll = F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        return LikelihoodTerms(nll, nll, None)

    def terms_k(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        """−log p(x|l) = Σ_d softplus(l_d) − x_d·l_d, the cross-entropy with logits for any x in [0, 1]: the
        products with the image as one contraction over its k outputs, with no k-fold copy of the image and two
        passes over the logits instead of the cross-entropy's several (twice as fast at k = 5000 on a CPU)."""
        logits = out.flatten(1).view(-1, len(x), x[0].numel())                 # (k, B, D)
        nll = F.softplus(logits).sum(-1) - torch.einsum("kbd,bd->kb", logits, x.flatten(1).to(logits.dtype))
        return LikelihoodTerms(nll.flatten(), nll.flatten(), None)


class FixedGaussian(Likelihood):
    """Gaussian with a fixed std ``model.sigma`` (the usual 'Gaussian VAE'; σ=1 by default)."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.register_buffer("log_sigma", torch.tensor(math.log(sigma)), persistent=False)

    @classmethod
    def from_config(cls, m: ModelConfig, batch_size: int) -> FixedGaussian:
        return cls(m.sigma)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        nll = gaussian_nll(x, self.mean(out), self.log_sigma)
        return LikelihoodTerms(nll, nll, self.log_sigma)


class AveragedMSE(Likelihood):
    """BASELINE, not a likelihood: the squared error *averaged* over each image's pixels, the KL summed.

    That is the optimum of a Gaussian with σ² = D/2 (σ ≈ 20 on MNIST): an implicit
    β of D/2 (392 on MNIST) on a σ = 1 Gaussian. Its reported NLL is that implied
    Gaussian's, so the ELBO is honest about what was trained. ``mse_batch`` is the
    σ-VAE authors' ``mse_vae``, which also averages over the batch.
    """

    def implied_log_sigma(self, d: int) -> float:
        """log σ of the Gaussian whose NLL this objective is, up to a constant."""
        return 0.5 * math.log(d / 2)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        mean = self.mean(out)
        d = x[0].numel()
        log_sigma = self.implied_log_sigma(d)
        rec = (x - mean).pow(2).flatten(1).sum(1) * (0.5 * math.exp(-2 * log_sigma))  # the Gaussian's quadratic term
        log_sigma = torch.tensor(log_sigma, device=x.device)
        return LikelihoodTerms(rec, gaussian_nll(x, mean, log_sigma), log_sigma)


class BatchAveragedMSE(AveragedMSE):
    """BASELINE: the σ-VAE authors' ``mse_vae`` (Rybkin et al. 2021's code): ``MSELoss()`` averaged over the
    batch *and* the pixels, plus the KL summed over the batch. Per image that is a Gaussian with
    σ² = B·D/2, B the global ``train.batch_size``: an implicit β of B·D/2 (50,176 on MNIST at B = 128)."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, m: ModelConfig, batch_size: int) -> BatchAveragedMSE:
        return cls(batch_size)

    def implied_log_sigma(self, d: int) -> float:
        return 0.5 * math.log(self.batch_size * d / 2)


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

    σ is not detached, as in the authors' code: without the soft floor it would be the
    closed-form maximiser and its gradient zero (envelope theorem), but with the floor
    σ² > MSE and the gradient through σ is real (×1.05 at MSE 0.008; far larger below
    the floor). Under DDP the squared error and the count are all-reduced first, so σ
    is the global batch's (2 processes give the σ of 1); the all-reduce is the
    differentiable one, whose backward all-reduces the gradients, so each process's
    share also gets the other processes' gradient through σ. (Every process must call
    this; only loss computations do.)
    """

    sigma_from_batch = True
    fixed_log_sigma: torch.Tensor | None = None  # evaluation: one σ for a whole test set (evaluate.py)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> LikelihoodTerms:
        mean = self.mean(out)
        if self.fixed_log_sigma is not None:
            nll = gaussian_nll(x, mean, self.fixed_log_sigma)
            return LikelihoodTerms(nll, nll, self.fixed_log_sigma)
        sse_n = torch.stack([(x - mean).pow(2).sum(), torch.tensor(float(x.numel()), device=x.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sse_n = dist_nn.all_reduce(sse_n)
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
    "mse_batch": BatchAveragedMSE,
    "sigma": LearnedSigma,
    "optimal_sigma": OptimalSigma,
    "per_pixel_sigma": PerPixelSigma,
}


def build_likelihood(m: ModelConfig, batch_size: int) -> Likelihood:
    return LIKELIHOODS[m.likelihood].from_config(m, batch_size)
