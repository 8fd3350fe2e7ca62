"""Objectives (estimators of the training loss), chosen by ``loss.objective``.

An objective takes the model and a batch and returns the loss and its parts,
each a batch-mean fp32 scalar. Every term is **summed over pixels and latent
dimensions and averaged over the batch** (nats per image), and computed in fp32
even under mixed precision: the networks may run in bf16/fp16, the likelihood,
KL and regulariser do not.

    elbo   loss = rec(x, x̂) + regulariser (+ the sharpening terms, models/perceptual.py),  z ~ q(z|x) once
           per image (reparameterised)
    iwae   loss = −log (1/k) Σ_j w_j,  w_j = p(x|z_j) · (p(z_j) / q(z_j|x))^β_t,  z_1..z_k ~ q(z|x)
           (Burda et al. 2016; ``loss.k`` samples; k = 1 is the ELBO with a one-sample KL estimate)
    ae     loss = rec(x, x̂) + regulariser (+ sharpening terms), z = E[z|x]: the deterministic autoencoder (AE,
           and with a regulariser that matches the prior, the AAE or WAE)

The reported ELBO is always −(−log p(x|z) + KL(q(z|x) || p(z))), whatever the
regulariser's weights, so runs with different β compare on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from models.discriminator import adversarial_terms
from models.gaussian import gaussian_log_density
from models.ladder import Lower, Params
from models.likelihoods import Likelihood, LikelihoodTerms
from models.objective_rules import OBJECTIVES, AERules, ELBORules, IWAERules, ObjectiveRules
from models.priors import Prior
from models.regularisers import PosteriorSample, Regulariser

if TYPE_CHECKING:
    from models.config import LossConfig
    from models.perceptual import Perceptual

class Model(Protocol):
    """What an objective uses of the VAE (models/vae.py, which composes the objectives: a protocol here, so the
    two modules do not import each other)."""

    likelihood: Likelihood
    prior: Prior
    regulariser: Regulariser
    perceptual: Perceptual

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decoder_out(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...

    def decoder_out_k(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...

    def encode_layers(self, x: torch.Tensor, y: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, list[Params] | None]: ...

    def decode_layers(self, z: torch.Tensor, y: torch.Tensor | None, below: list[Params] | None,
                      draw: bool = True) -> tuple[torch.Tensor, Lower | None]: ...

    def kl_weight(self, step: int | None) -> float: ...


def kl_divergence(vae: Model, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || p(z)) per image (B,): closed form where the prior has one, else the one-sample Monte Carlo
    estimate log q(z|x) − log p(z) at the sampled z (unbiased, noisier)."""
    per_dim = vae.prior.kl_per_dim(mu, logvar)
    if per_dim is not None:
        return per_dim.sum(1)
    return gaussian_log_density(z, mu, logvar) - vae.prior.log_prob(z)


def importance_parts(vae: Model, x: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                     out: torch.Tensor, log_prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     lower: Lower | None = None) -> tuple[torch.Tensor, torch.Tensor, LikelihoodTerms]:
    """The parts of the importance weights w_j = p(x|z_j) p(z_j) / q(z_j|x) of k codes per image, in fp32:
    (log p(x|z_j) (k, B), log p(z_j) − log q(z_j|x) (k, B), the likelihood's terms), from images x (B, ...),
    codes z (k, B, z), the posterior's (mu, logvar) and the decoder's output for the codes (k·B, ...).
    ``log_prior``: ``vae.prior.about(mu)``, made once by a caller that draws an image's codes in chunks. A
    ladder's ``lower`` layers (``decode_layers``) add Σ_l log p(z_l | z_l+1) − log q(z_l | z_l+1, x) to the
    ratio, so w = p(x|z_1) Π_l p(z_l | z_l+1) p(z_L) / Π_l q(z_l | ...): the bound through every layer. The
    one computation behind the IWAE objective and the bounds evaluate.py reports."""
    k = z.shape[0]
    lik = vae.likelihood.terms_k(x, out)
    log_ratio = (log_prior or vae.prior.about(mu))(z) - gaussian_log_density(z, mu, logvar)
    if lower is not None:
        log_ratio = log_ratio + lower.log_ratio.view(k, -1)
    return -lik.nll.view(k, -1), log_ratio, lik


def layer_kls(vae: Model, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor,
              lower: Lower | None) -> list[torch.Tensor]:
    """Each stochastic layer's KL per image (B,), bottom first, the top one's (at codes z (B, z)) last: a ladder's
    lower layers' KL(q(z_l | z_l+1, x) || p(z_l | z_l+1)) at the first drawn code of each image (one entry for a
    one-layer model). Their sum is the KL of the ELBO."""
    below = [] if lower is None else [kl.view(-1, len(z))[0] for kl in lower.kl]
    return [*below, kl_divergence(vae, mu, logvar, z)]


def kl_terms(kls: list[torch.Tensor], lower: Lower | None) -> dict[str, torch.Tensor]:
    """A ladder's per-layer KL terms to log, kl_1 (bottom) ... kl_L (top), batch means (none for one layer)."""
    return {} if lower is None else {f"kl_{i + 1}": kl.mean() for i, kl in enumerate(kls)}


def trained_kl(kls: list[torch.Tensor], loss: LossConfig, warming: bool, sizes: list[int]) -> torch.Tensor:
    """The KL per image (B,) that the regulariser weighs, from the layers' KLs (B,) each, with the training aids:

    free bits (Kingma et al. 2016, §C.8): a layer whose batch-mean KL is below λ = ``loss.free_bits`` costs λ
    and gets no gradient, max(λ, E_batch KL_l), so it is not pushed to collapse; each image carries λ there.
    KL balancing (Vahdat & Kautz 2020, §3.2, their ``kl_balancer``), only while the KL warms up: layer l's KL is
    weighted by γ_l ∝ (E_batch KL_l + 0.01) / α_l with α_l ∝ its size z_l, the weights (no gradient) averaging
    1, so layers that carry much KL per unit are pushed down more and the others are not left to collapse.
    """
    if loss.free_bits > 0:
        kls = [torch.where(kl.mean() < loss.free_bits, torch.full_like(kl, loss.free_bits), kl) for kl in kls]
    if loss.kl_balance and warming:
        per = torch.stack([kl.mean().abs() + 0.01 for kl in kls]).detach()
        gamma = per / torch.tensor(sizes, device=per.device, dtype=per.dtype)
        gamma = gamma / gamma.mean()
        return sum(g * kl for g, kl in zip(gamma, kls))
    return kls[0] if len(kls) == 1 else sum(kls)


class Objective(ObjectiveRules):
    """Computes the training loss of a batch; ``__call__(vae, x, step, y) -> terms`` (y: labels, or None).
    What it states for the config (``deterministic``, ``check``) is its rules class's (objective_rules.py)."""

    def __init__(self, loss: LossConfig):
        self.cfg = loss

    @classmethod
    def from_config(cls, loss: LossConfig) -> Objective:
        return cls(loss)

    def __call__(self, vae: Model, x: torch.Tensor, step: int | None,
                 y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class ELBO(ELBORules, Objective):
    """The evidence lower bound with one reparameterised sample per image (Kingma & Welling 2014)."""

    def __call__(self, vae: Model, x: torch.Tensor, step: int | None,
                 y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        mu, logvar, below = vae.encode_layers(x, y)                  # (B, z) each; a ladder's lower layers
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)      # reparameterisation
        out, lower = vae.decode_layers(z.unsqueeze(0), y, below)     # (B, C·n_params, H, W); z_L−1 .. z_1 drawn
        with torch.autocast(device_type=x.device.type, enabled=False):
            mu, logvar, z, out, x = mu.float(), logvar.float(), z.float(), out.float(), x.float()
            lik = vae.likelihood(x, out)                             # (B,) terms
            kls = layer_kls(vae, mu, logvar, z, lower)               # (B,) per layer, bottom first
            kl = sum(kls)                                            # (B,)
            sizes = [m.shape[1] for m in (lower.means if lower else [])] + [z.shape[1]]
            trained = trained_kl(kls, self.cfg, vae.kl_weight(step) < self.cfg.beta, sizes)
            penalty, extra = vae.regulariser(trained, PosteriorSample(z, mu, logvar), vae.prior, step)
            sharp, shown = vae.perceptual(x, lambda: vae.likelihood.mean(out))  # sharpening terms, not in the bound
            rec = lik.rec.mean()
            terms = {"rec": rec, "kl": kl.mean(), "nll": lik.nll.mean(),
                     "elbo": -(lik.nll + kl).mean(), **kl_terms(kls, lower), **extra, **shown}
            if lik.log_sigma is not None:
                terms["sigma"] = lik.log_sigma.detach().exp()
            terms["loss"] = rec + penalty + sharp
            terms |= adversarial_terms(vae, x, out, rec + sharp, terms["loss"], step)
        return terms


class IWAE(IWAERules, Objective):
    """The importance-weighted bound with ``loss.k`` reparameterised samples per image (Burda et al. 2016).

    It tightens towards log p(x) as k grows, and its gradient weights each sample by its
    normalised importance weight. β_t (the KL weight and its warm-up) scales log p(z) − log q(z|x)
    inside each weight, so β = 1 is the bound itself. The logged ``elbo`` is the usual one, from
    the k samples' mean reconstruction and the KL, so runs of either objective compare; ``iwae``
    is the bound trained on.
    """

    def __call__(self, vae: Model, x: torch.Tensor, step: int | None,
                 y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        k = self.cfg.k
        mu, logvar, below = vae.encode_layers(x, y)                             # (B, z) each
        z = mu + torch.randn(k, *mu.shape, device=mu.device, dtype=mu.dtype) * torch.exp(0.5 * logvar)  # (k, B, z)
        out, lower = vae.decode_layers(z, y, below)                             # (k·B, C·n_params, H, W)
        with torch.autocast(device_type=x.device.type, enabled=False):
            mu, logvar, z, out, x = mu.float(), logvar.float(), z.float(), out.float(), x.float()
            log_px_z, log_ratio, lik = importance_parts(vae, x, z, mu, logvar, out, lower=lower)  # (k, B) each
            log_w = log_px_z + vae.kl_weight(step) * log_ratio
            bound = torch.logsumexp(log_w, 0) - math.log(k)                     # (B,)
            kls = layer_kls(vae, mu, logvar, z[0], lower)
            kl = sum(kls)
            nll = -log_px_z.mean(0)
            terms = {"rec": nll.mean(), "kl": kl.mean(), "nll": nll.mean(), "elbo": -(nll + kl).mean(),
                     **kl_terms(kls, lower), "iwae": bound.mean(), "loss": -bound.mean()}
            if lik.log_sigma is not None:
                terms["sigma"] = lik.log_sigma.detach().exp()
        return terms


class AE(AERules, Objective):
    """A deterministic autoencoder: z is the encoder's mean, the loss the reconstruction term plus the
    regulariser's (an AAE's adversarial loss, a WAE's MMD), with no KL and no posterior variance. There is no
    bound on log p(x): the terms are rec, nll (−log p(x|z) at the code) and the regulariser's."""

    def __call__(self, vae: Model, x: torch.Tensor, step: int | None,
                 y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        mu, logvar = vae.encode(x, y)                                # (B, z) each; logvar unused but by DIP-II
        out = vae.decoder_out(mu, y)                                 # (B, C·n_params, H, W)
        with torch.autocast(device_type=x.device.type, enabled=False):
            mu, logvar, out, x = mu.float(), logvar.float(), out.float(), x.float()
            lik = vae.likelihood(x, out)
            penalty, extra = vae.regulariser(torch.zeros(len(x), device=x.device), PosteriorSample(mu, mu, logvar),
                                             vae.prior, step)
            sharp, shown = vae.perceptual(x, lambda: vae.likelihood.mean(out))  # sharpening terms, not in the bound
            rec = lik.rec.mean()
            terms = {"rec": rec, "nll": lik.nll.mean(), **extra, **shown, "loss": rec + penalty + sharp}
            terms |= adversarial_terms(vae, x, out, rec + sharp, terms["loss"], step)
            if lik.log_sigma is not None:
                terms["sigma"] = lik.log_sigma.detach().exp()
        return terms


def build_objective(loss: LossConfig) -> Objective:
    return OBJECTIVES[loss.objective].load().from_config(loss)
