"""One VAE: encoder -> q(z|x) -> z -> decoder -> p(x|z), with the objective composed from YAML.

VAE, β-VAE, MMD-VAE and σ-VAE differ only in the likelihood and the weights:

    loss = rec(x, x̂) + β_t · KL(q(z|x) || N(0, I)) + mmd_weight · MMD(q(z) || N(0, I))

with β_t the KL warm-up. All terms are summed over pixels / latent dimensions,
averaged over the batch, and computed in fp32 even under mixed precision.
"""

from __future__ import annotations

import torch
from torch import nn

from models.likelihoods import build_likelihood
from models.networks import build_networks
from models.regularisers import kl_normal, mmd
from utils.config import Config


class VAE(nn.Module):
    def __init__(self, cfg: Config, img_shape: tuple[int, int, int]):
        super().__init__()
        m = cfg.model
        self.img_shape = tuple(img_shape)
        self.z_dim = m.z_dim
        self.likelihood = build_likelihood(m.likelihood, m.sigma)
        self.encoder, self.decoder = build_networks(
            m.net, self.img_shape, m.z_dim, self.likelihood.n_params, m.hidden, m.base_width, m.channel_mults)
        self.beta = cfg.loss.beta
        self.kl_warmup_steps = cfg.loss.kl_warmup_steps
        self.mmd_weight = cfg.loss.mmd_weight
        self.mmd_kernel = cfg.loss.mmd_kernel

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, logvar), each (B, z)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded images in [0, 1], (B, C, H, W): the likelihood's mean."""
        return self.likelihood.mean(self.decoder(z).float())

    def kl_weight(self, step: int) -> float:
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.kl_warmup_steps)

    def forward(self, x: torch.Tensor, step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for a batch x in [0, 1], (B, C, H, W); each a batch-mean fp32 scalar.

        ``step`` sets the KL warm-up; ``None`` means fully warmed up (evaluation).
        Returns loss (the training objective), rec, kl, mmd, nll (-log p(x|z)),
        elbo (-(nll + kl), the evidence lower bound) and sigma (decoder σ, when defined).
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
        out = self.decoder(z)
        with torch.autocast(device_type=x.device.type, enabled=False):
            mu, logvar, z, out, x = mu.float(), logvar.float(), z.float(), out.float(), x.float()
            lik = self.likelihood(x, out)
            kl = kl_normal(mu, logvar)  # (B,)
            beta = self.kl_weight(step) if step is not None else self.beta
            loss = lik.rec.mean() + beta * kl.mean()
            terms = {"rec": lik.rec.mean(), "kl": kl.mean(), "nll": lik.nll.mean(),
                     "elbo": -(lik.nll + kl).mean()}
            if self.mmd_weight > 0:
                terms["mmd"] = mmd(z, torch.randn_like(z), self.mmd_kernel)
                loss = loss + self.mmd_weight * terms["mmd"]
            if lik.log_sigma is not None:
                terms["sigma"] = lik.log_sigma.detach().exp()
            terms["loss"] = loss
        return terms
