"""One VAE: encoder -> q(z|x) -> z -> decoder -> p(x|z), with prior, objective and regulariser from YAML.

VAE, β-VAE, MMD-VAE and σ-VAE are not four models: they differ only in the parts
chosen by name, each from its registry:

    model.net          networks.NETWORKS               encoder and decoder
    model.likelihood   likelihoods.LIKELIHOODS         p(x|z)
    model.prior        prior_rules.PRIORS              p(z)
    loss.objective     objective_rules.OBJECTIVES      how the loss is estimated (ELBO)
    loss.regulariser   regulariser_rules.REGULARISERS  the latent term (β·KL, + MMD)

and, with ``loss.disc_weight`` > 0, an image discriminator whose adversarial term the objective adds to the loss
(models/discriminator.py).

(A prior's, an objective's and a regulariser's registry holds its rules class, torch-free, which the part's
torch class subclasses: its ``load()`` gives that class.)

With ``model.latent_dims`` and a ladder network it is a hierarchical VAE (Ladder VAE, models/ladder.py) whose
z is the top of L stochastic layers. With ``model.conditional`` it is a conditional VAE (Sohn et al. 2015): q(z|x, y)
and p(x|z, y) also read the one-hot class label y, the prior stays p(z), and every
method that takes images or codes takes their labels ``y`` too. An unconditional
model ignores ``y``, so callers pass labels wherever a data set has them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from models.discriminator import ImageDiscriminator, build_discriminator
from models.ladder import Lower, Params
from models.likelihoods import build_likelihood
from models.networks import build_networks
from models.objectives import build_objective
from models.perceptual import Perceptual
from models.priors import build_prior
from models.regularisers import Regulariser, build_regulariser
from utils.errors import UserError

if TYPE_CHECKING:
    from models.config import LossConfig, ModelConfig


class VAE(nn.Module):
    """Built from the ``model`` and ``loss`` config sections, the images' shape (C, H, W) and the global
    training batch size (which the batch-averaged MSE baseline's implied σ depends on); nothing else of the
    run's config. ``perceptual_terms``: build the sharpening terms (models/perceptual.py), which only training
    uses (an inference model leaves them out, and so needs no LPIPS weights file)."""

    perceptual_terms = True

    def __init__(self, model: ModelConfig, loss: LossConfig, img_shape: tuple[int, int, int], batch_size: int = 1):
        super().__init__()
        self.img_shape = tuple(img_shape)
        self.z_dim = model.z_dim
        self.n_classes = model.n_classes if model.conditional else 0  # 0: unconditional
        if model.conditional and self.n_classes < 2:
            raise UserError(f"model.conditional=true with model.n_classes={model.n_classes}: a conditional model "
                            f"needs at least 2 classes: set model.n_classes to the data's (training takes it from "
                            f"the labels with 0), or model.conditional=false")
        self.likelihood = build_likelihood(model, batch_size)
        self.encoder, self.decoder = build_networks(model, self.img_shape, self.likelihood.n_params, self.n_classes)
        self.prior = build_prior(model, self.img_shape)
        self.prior.bind(self.encoder)
        self.regulariser = build_regulariser(loss, model.z_dim)
        self.perceptual = Perceptual(loss if self.perceptual_terms else None, self.img_shape)
        self.objective = build_objective(loss)
        self.discriminator = build_discriminator(loss, self.img_shape, self.decoder)

    @property
    def deterministic(self) -> bool:
        """An autoencoder (``loss.objective=ae``): no posterior variance, no KL, no bound on log p(x)."""
        return self.objective.deterministic

    @property
    def has_prior(self) -> bool:
        """Whether draws from the prior decode to images: a VAE's, or an autoencoder whose regulariser pulls its
        codes to the prior (AAE, WAE); a plain autoencoder needs an ex-post sampler (sample.py --sampler)."""
        return not self.deterministic or self.regulariser.matches_prior

    @property
    def convolutional(self) -> bool:
        """Whether the networks are convolutional (faster on channels-last images)."""
        return getattr(self.encoder, "convolutional", False)

    def one_hot(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The labels of the images or codes ``like`` as one-hot rows (B, n_classes) on their device, for a
        conditional model; None for an unconditional one."""
        if not self.n_classes:
            return None
        if y is None:
            raise UserError("this is a conditional VAE (model.conditional=true): it needs the class label of each "
                            "image or code; pass labels (sample.py --label)")
        n = len(like)
        if len(y) != n or (not self.training and (int(y.min()) < 0 or int(y.max()) >= self.n_classes)):
            # (training reads the data set's labels, checked once when it loads: no host sync per step)
            raise UserError(f"labels must be {n} class indices in 0..{self.n_classes - 1}, got {y.tolist()[:8]}: "
                            f"pass labels of the classes the model was trained on")
        y = y.to(like.device).long().view(-1, 1)
        return torch.zeros(n, self.n_classes, device=like.device).scatter_(1, y, 1.0)

    def grid_labels(self, n: int, per_row: int = 8) -> torch.Tensor | None:
        """Labels for a grid of n samples with one class per row (cycling through the classes), for a
        conditional model; None for an unconditional one."""
        return torch.arange(n) // per_row % self.n_classes if self.n_classes else None

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, logvar), each (B, z)."""
        c = self.one_hot(y, x)
        return self.encoder(x) if c is None else self.encoder(x, c)

    def decoder_out(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's raw per-pixel parameters (B, C·n_params, H, W) for codes z (B, z)."""
        c = self.one_hot(y, z)
        return self.decoder(z if c is None else torch.cat([z, c.to(z.dtype)], 1))

    def decoder_out_k(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's parameters for k codes per image, z (k, B, z) -> (k·B, C·n_params, H, W), sample-major;
        each image's label goes with each of its k codes."""
        return self.decoder_out(z.flatten(0, 1), None if y is None else y.repeat(len(z)))

    @property
    def hierarchical(self) -> bool:
        """Whether the networks are a ladder of stochastic layers (models/ladder.py), z being the top one."""
        return getattr(self.encoder, "hierarchical", False)

    def encode_layers(self, x: torch.Tensor, y: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, list[Params] | None]:
        """The top layer's posterior (mu, logvar), each (B, z), and a ladder's bottom-up parameters of the layers
        below it (bottom first; None for a one-layer model), which ``decode_layers`` takes."""
        if not self.hierarchical:
            return *self.encode(x, y), None
        *below, (mu, logvar) = self.encoder.layers(x)
        return mu, logvar, below

    def decode_layers(self, z: torch.Tensor, y: torch.Tensor | None, below: list[Params] | None,
                      draw: bool = True) -> tuple[torch.Tensor, Lower | None]:
        """The decoder's parameters for k top codes per image, z (k, B, z) -> (k·B, C·n_params, H, W), sample-major,
        drawing a ladder's lower layers from their posteriors given ``below`` (``encode_layers``; ``draw=False``:
        at their means), with what they add to the KL and the importance weights (None for a one-layer model)."""
        if below is None:
            return self.decoder_out_k(z, y), None
        k = len(z)
        return self.decoder.posterior(z.flatten(0, 1), [(m.repeat(k, 1), v.repeat(k, 1)) for m, v in below], draw)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None, temperature: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoded images in [0, 1], (B, C, H, W): the likelihood's mean. A ladder's lower layers are taken at their
        conditional prior means, or with ``temperature`` T > 0 drawn with their std × T from ``generator``."""
        if not temperature:
            return self.likelihood.mean(self.decoder_out(z, y).float())
        if not self.hierarchical:
            raise UserError(f"a temperature ({temperature:g}) scales the draws of a Ladder VAE's lower layers, and "
                            f"this model has one stochastic layer: drop it")
        return self.likelihood.mean(self.decoder(z, temperature, generator).float())

    @property
    def latent_layers(self) -> int:
        """The number of stochastic layers L: a ladder's, else 1."""
        return len(self.decoder.top_down) + 1 if self.hierarchical else 1

    def decode_layer(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """Images in [0, 1] decoded from codes z (N, z_layer) of a ladder's 0-based ``layer`` below the top, each
        layer under it at its conditional prior mean."""
        return self.likelihood.mean(self.decoder.from_layer(z, layer).float())

    def reconstruction(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] decoded from their posterior means, (B, C, H, W): a ladder's through every layer, each
        at its posterior mean given the layer above (decoding the top code alone would take the lower layers
        from the prior)."""
        mu, _, below = self.encode_layers(x, y)
        if below is None:
            return self.decode(mu, y)
        out, _ = self.decode_layers(mu.unsqueeze(0), y, below, draw=False)
        return self.likelihood.mean(out.float())

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the VAE's optimizer trains: everything but a regulariser's own network (FactorVAE's critic)."""
        aux = {id(p) for c in self.critics().values() for p in c.auxiliary_parameters()}
        return [p for p in self.parameters() if id(p) not in aux]

    def critics(self) -> dict[str, Regulariser | ImageDiscriminator]:
        """The parts with a network of their own, trained by ``after_step`` (a regulariser's critic, the image
        discriminator), by the checkpoint file of their state."""
        reg = {"regulariser.safetensors": self.regulariser} if self.regulariser.auxiliary_parameters() else {}
        return reg | ({"discriminator.safetensors": self.discriminator} if self.discriminator is not None else {})

    def after_step(self, accelerator, bad: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train the critics after the VAE's step (each skipped with it when ``bad``); their terms to log."""
        terms: dict[str, torch.Tensor] = {}
        for critic in self.critics().values():
            terms |= critic.after_step(accelerator, bad)
        return terms

    def kl_weight(self, step: int | None) -> float:
        return self.regulariser.kl_weight(step)

    def forward(self, x: torch.Tensor, step: int | None = None,
                y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for a batch x in [0, 1], (B, C, H, W); each a batch-mean fp32 scalar.

        ``step`` sets the KL warm-up; ``None`` means fully warmed up (evaluation).
        Returns loss (the training objective), rec, kl, nll (-log p(x|z)), elbo
        (-(nll + kl), the evidence lower bound), and the regulariser's own terms
        (mmd) and sigma (the decoder's σ) where they exist. ``y``: the images' labels (B,), for a
        conditional model.
        """
        return self.objective(self, x, step, y)
