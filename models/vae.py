"""One VAE: encoder -> q(z|x) -> z -> decoder -> p(x|z), with prior, objective and regulariser from YAML.

VAE, β-VAE, MMD-VAE and σ-VAE are not four models: they differ only in the parts
chosen by name, each from its registry:

    model.net          networks.NETWORKS          encoder and decoder
    model.likelihood   likelihoods.LIKELIHOODS    p(x|z)
    model.prior        priors.PRIORS              p(z)
    loss.objective     objectives.OBJECTIVES      how the loss is estimated (ELBO)
    loss.regulariser   regularisers.REGULARISERS  the latent term (β·KL, + MMD)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from models.likelihoods import build_likelihood
from models.networks import build_networks
from models.objectives import build_objective
from models.priors import build_prior
from models.regularisers import build_regulariser

if TYPE_CHECKING:
    from utils.config import Config


class VAE(nn.Module):
    def __init__(self, cfg: Config, img_shape: tuple[int, int, int]):
        super().__init__()
        self.img_shape = tuple(img_shape)
        self.z_dim = cfg.model.z_dim
        self.likelihood = build_likelihood(cfg)
        self.encoder, self.decoder = build_networks(cfg.model, self.img_shape, self.likelihood.n_params)
        self.prior = build_prior(cfg.model, self.img_shape)
        self.prior.bind(self.encoder)
        self.regulariser = build_regulariser(cfg.loss, cfg.model.z_dim)
        self.objective = build_objective(cfg.loss)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, logvar), each (B, z)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded images in [0, 1], (B, C, H, W): the likelihood's mean."""
        return self.likelihood.mean(self.decoder(z).float())

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the VAE's optimizer trains: everything but a regulariser's own network (FactorVAE's critic)."""
        aux = {id(p) for p in self.regulariser.auxiliary_parameters()}
        return [p for p in self.parameters() if id(p) not in aux]

    def kl_weight(self, step: int | None) -> float:
        return self.regulariser.kl_weight(step)

    def forward(self, x: torch.Tensor, step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for a batch x in [0, 1], (B, C, H, W); each a batch-mean fp32 scalar.

        ``step`` sets the KL warm-up; ``None`` means fully warmed up (evaluation).
        Returns loss (the training objective), rec, kl, nll (-log p(x|z)), elbo
        (-(nll + kl), the evidence lower bound), and the regulariser's own terms
        (mmd) and sigma (the decoder's σ) where they exist.
        """
        return self.objective(self, x, step)
