"""The regulariser's interface: what the objective hands it (the KL per image, the sampled codes with their
posterior's parameters, the prior) and what a regulariser states of itself (class attributes and class
methods), so that no code outside it tests its name. The regularisers themselves are in regularisers.py,
total_correlation.py and adversarial.py; the registry, ``REGULARISERS``, in regularisers.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.priors import Prior
from utils.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    from models.config import LossConfig


@dataclass
class PosteriorSample:
    """What the objective drew for a batch: z ~ q(z|x) and the posterior's parameters, each (B, z), fp32."""

    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class Regulariser(nn.Module):
    """β_t · KL, plus whatever a subclass adds. Returns (the batch's penalty, extra terms to log).

    What a regulariser needs of the run is said here, as class attributes and class methods, so no code
    outside it tests its name: ``plain_kl`` (it is β·KL and nothing more: the IWAE bound can take it),
    ``min_batch`` (it estimates over the batch), ``accumulates`` (its term can be split over micro-batches),
    ``deterministic_ok``, ``matches_prior`` and ``trains_prior`` (below), ``check`` (its keys' rules) and
    ``complete_config`` (values it takes from the training set, when the config is resolved)."""

    plain_kl = False
    min_batch = 1
    accumulates = True
    deterministic_ok = False  # usable by a deterministic autoencoder (loss.objective=ae): no KL, no posterior σ
    matches_prior = False     # pulls the codes' distribution to the prior, so that prior draws decode to images
    trains_prior = False      # its term draws from the prior with gradients, which train a learned prior without a KL

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        """Refuse, in one line, ``loss`` keys that cannot take effect with this regulariser."""
        if loss.mmd_weight > 0:
            raise UserError(f"loss.mmd_weight={loss.mmd_weight:g} has no effect with loss.regulariser="
                            f"{loss.regulariser}: set loss.regulariser=mmd, or drop mmd_weight")

    @classmethod
    def complete_config(cls, loss: LossConfig, train_size: Callable[[], int]) -> None:
        """Fill keys left at 0 ('from the data') when the config is resolved, so that --dry-run shows them and
        config.yaml records them. ``train_size()`` counts the training set from its metadata: call it only when
        a key needs it (counting some sets opens their files)."""

    def __init__(self, loss: LossConfig):
        super().__init__()
        self.beta, self.warmup = loss.beta, loss.kl_warmup_steps

    @classmethod
    def from_config(cls, loss: LossConfig, z_dim: int) -> Regulariser:
        return cls(loss)

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by ``after_step``, not by the VAE's optimizer."""
        return []

    def after_step(self, accelerator, bad: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train what the regulariser owns after the VAE's step (skipped with it when ``bad``); terms to log."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Training state beyond the parameters (an optimizer's moments), for checkpoints."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def kl_weight(self, step: int | None) -> float:
        """β_t: linear warm-up from 0 to β; ``None`` (evaluation) means fully warmed up."""
        if step is None or self.warmup <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.warmup)

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.kl_weight(step) * kl.mean(), {}
