"""Regularisers with a network of their own, trained after each VAE step on that step's codes: FactorVAE's
critic (Kim & Mnih 2018) and the adversarial autoencoder's discriminator (Makhzani et al. 2016).

Both share ``CriticRegulariser``: the network is kept out of the VAE's optimizer
(``auxiliary_parameters``) and trained in ``after_step`` on the step's codes, detached, by a ``CriticTrainer``
(critic.py, which the image discriminator uses too): its own Adam, skipped on the device when the VAE's step
was, its gradients averaged over processes, its moments checkpointed, so a resume is exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.critic import CriticTrainer
from models.priors import Prior
from models.regulariser_base import PosteriorSample, Regulariser
from models.regulariser_rules import AdversarialRules, CriticRules, FactorVAERules

if TYPE_CHECKING:
    from models.config import LossConfig

def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Each column of z (B, d) shuffled on its own: samples of Π_d q(z_d) from samples of q(z)."""
    order = torch.argsort(torch.rand(z.shape, device=z.device), dim=0)
    return torch.gather(z, 0, order)


class Critic(nn.Module):
    """An MLP on codes with LeakyReLU(0.2) and ``outputs`` logits: FactorVAE's tells codes z ~ q(z) (class 0) from
    permuted codes (class 1); the AAE's discriminator (one logit) prior draws from codes."""

    def __init__(self, z_dim: int, hidden: list[int], outputs: int = 2):
        super().__init__()
        sizes = [z_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], outputs))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class CriticRegulariser(CriticRules, Regulariser):
    """A regulariser with a network of its own (see the module's docstring), trained by a ``CriticTrainer``. A
    subclass builds ``critic`` and says how it is trained in ``critic_loss``; its ``forward`` calls ``remember``
    with the step's codes."""

    missing_state = "the run had another loss.regulariser; resume with that one"

    def __init__(self, loss: LossConfig, critic: nn.Module, lr: float):
        super().__init__(loss)
        self.critic = critic
        self.trainer = CriticTrainer(critic, lr)
        self._codes: torch.Tensor | None = None

    @classmethod
    def from_config(cls, loss: LossConfig, z_dim: int) -> CriticRegulariser:
        return cls(loss, z_dim)

    def remember(self, z: torch.Tensor) -> None:
        """Keep the step's codes (detached) for ``after_step``; evaluation keeps nothing."""
        if self.training:
            self._codes = z.detach()

    def critic_loss(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the network's loss on the step's codes z (B, d), fp32, its accuracy)."""
        raise NotImplementedError

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    def after_step(self, accelerator, bad: torch.Tensor) -> dict[str, torch.Tensor]:
        z, self._codes = self._codes, None

        def loss_fn() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss, accuracy = self.critic_loss(z.float())
            return loss, {"critic_loss": loss.detach(), "critic_accuracy": accuracy}
        return self.trainer.step(accelerator, bad, loss_fn)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.trainer.state_tensors()

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.trainer.load_state_tensors(state)


class FactorVAE(FactorVAERules, CriticRegulariser):
    """β_t · KL + γ · TC (Kim & Mnih 2018), TC = KL(q(z) ‖ Π_d q(z_d)) estimated by the density-ratio trick:
    mean(logit_0 − logit_1) of a critic trained to tell codes from permuted codes. The critic is trained after
    each VAE step on that step's codes, detached, and their permutation (disentanglement_lib's one-batch
    variant; the paper permutes a second batch), with lr ``loss.factor_critic_lr``, as the paper. Logs tc,
    critic_loss and critic_accuracy."""

    def __init__(self, loss: LossConfig, z_dim: int):
        super().__init__(loss, Critic(z_dim, loss.factor_critic_hidden), loss.factor_critic_lr)
        self.gamma = loss.factor_gamma

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, _ = super().forward(kl, codes, prior, step)
        logits = self.critic(codes.z)
        tc = (logits[:, 0] - logits[:, 1]).mean()
        self.remember(codes.z)
        return penalty + self.gamma * tc, {"tc": tc}

    def critic_loss(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        real, fake = self.critic(z), self.critic(permute_dims(z))
        ones = torch.ones(len(z), dtype=torch.long, device=z.device)
        loss = 0.5 * (F.cross_entropy(real, 0 * ones) + F.cross_entropy(fake, ones))
        accuracy = 0.5 * ((real.argmax(1) == 0).float().mean() + (fake.argmax(1) == 1).float().mean())
        return loss, accuracy


def discriminator_losses(on_prior: torch.Tensor, on_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the discriminator's loss, the encoder's) from its logits on prior draws (B,) and on codes (B,), the
    non-saturating GAN losses of Makhzani et al. 2016: the discriminator takes prior draws for real (1) and codes
    for fake (0), ½ [BCE(D(p), 1) + BCE(D(q), 0)]; the encoder is trained to have its codes taken for real,
    BCE(D(q), 1) = mean softplus(−D(q))."""
    d = 0.5 * (F.binary_cross_entropy_with_logits(on_prior, torch.ones_like(on_prior))
               + F.binary_cross_entropy_with_logits(on_codes, torch.zeros_like(on_codes)))
    return d, F.binary_cross_entropy_with_logits(on_codes, torch.ones_like(on_codes))


class Adversarial(AdversarialRules, CriticRegulariser):
    """The adversarial autoencoder (Makhzani et al. 2016): β_t · KL (absent with ``loss.objective=ae``, the
    paper's deterministic encoder) + ``loss.aae_weight`` · the encoder's adversarial loss, from a discriminator
    on z (an MLP, ``loss.aae_hidden``; the paper's two layers of 1000) trained after each step to tell prior
    draws from the step's codes (lr ``loss.aae_lr``). Logs adversarial, critic_loss and critic_accuracy.

    The updates are pythae's simultaneous ones, not the paper's three phases (reconstruction; then the
    discriminator; then the encoder against the updated discriminator): one forward gives the reconstruction
    and the encoder's adversarial term, against the discriminator as it stands, and one step of the VAE's
    optimizer takes both; the discriminator then steps on that forward's codes, detached, which the encoder
    made before its update. Each side thus answers the other's previous step, as in a simultaneous GAN update."""

    def __init__(self, loss: LossConfig, z_dim: int):
        super().__init__(loss, Critic(z_dim, loss.aae_hidden, outputs=1), loss.aae_lr)
        self.weight = loss.aae_weight
        self._prior: list[Prior] = []

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, _ = super().forward(kl, codes, prior, step)
        encoder_loss = F.binary_cross_entropy_with_logits(self.critic(codes.z)[:, 0],
                                                          torch.ones(len(codes.z), device=codes.z.device))
        self.remember(codes.z)
        self._prior = [prior]  # (a list: not a submodule of this one)
        return penalty + self.weight * encoder_loss, {"adversarial": encoder_loss}

    def critic_loss(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # a learned prior's draws (a VampPrior's) would leave gradients on the VAE
            drawn = self._prior[0].sample(len(z), device=z.device).to(z.dtype)
        on_prior, on_codes = self.critic(drawn)[:, 0], self.critic(z)[:, 0]
        loss, _ = discriminator_losses(on_prior, on_codes)
        accuracy = 0.5 * ((on_prior > 0).float().mean() + (on_codes < 0).float().mean())
        return loss, accuracy
