"""The regulariser's interface: what the objective hands it (the KL per image, the sampled codes with their
posterior's parameters, the prior). What a regulariser states of itself for the config (class attributes and
class methods, so that no code outside it tests its name) is in its rules class, and the registry,
``REGULARISERS``, in regulariser_rules.py; the regularisers themselves are in regularisers.py,
total_correlation.py and adversarial.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.priors import Prior
from models.regulariser_rules import RegulariserRules

if TYPE_CHECKING:
    from models.config import LossConfig


@dataclass
class PosteriorSample:
    """What the objective drew for a batch: z ~ q(z|x) and the posterior's parameters, each (B, z), fp32."""

    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class Regulariser(RegulariserRules, nn.Module):
    """β_t · KL, plus whatever a subclass adds. Returns (the batch's penalty, extra terms to log).

    What a regulariser needs of the run (``plain_kl``, ``min_batch``, ``check``, ...) is its rules class's
    (regulariser_rules.py): a subclass subclasses its own rules class first, ``class MMD(MMDRules, Regulariser)``."""

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
