"""An adversarial reconstruction term: a PatchGAN discriminator on images (Isola et al. 2017) in the 3-layer
design of Esser et al. 2021 (taming-transformers), with its hinge or non-saturating loss, the adaptive weight
that balances it against the reconstruction term, and a start step before which it is off.

The decoder is trained on loss + λ · g_adv, g_adv = −mean D(x̂) (taming's generator loss, for either
discriminator loss), x̂ the likelihood's mean, with

    λ = ``loss.disc_weight`` · clamp(‖∇_w rec‖ / (‖∇_w g_adv‖ + 1e-4), 0, 1e4), detached,

w the decoder's last layer's weight and rec the reconstruction term the objective trains on. The norms are taken
in fp32 (the weight and its gradients are fp32 under autocast) and a non-finite λ is replaced by 0 (an infinite
one by the clamp), so it stays finite under bf16/fp16, where latent-diffusion's turned NaN. Under DDP the two
gradients are averaged over processes before their norms, so λ is the one a single process would compute on the
global batch, and the same on every process.

The discriminator is trained after each VAE step on that step's images and reconstructions, detached, by a
``CriticTrainer`` (critic.py, the one FactorVAE and the AAE use), on hinge: ½ [mean relu(1 − D(x)) + mean
relu(1 + D(x̂))] or non_saturating: ½ [mean softplus(−D(x)) + mean softplus(D(x̂))]. Before
``loss.disc_start`` the adversarial term is multiplied by 0 (the discriminator still sees x̂, so that under DDP
every parameter takes part in each step) and the discriminator is not trained, as taming's ``disc_factor``.

Normalisation: GroupNorm, not taming's BatchNorm. BatchNorm's batch statistics differ between processes under
DDP (each sees its own share of the batch) and between the real and the fake batch, so the discriminator would
compute another function on each process; GroupNorm normalises each image alone, so its logits do not depend on
how the batch is split.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.critic import CriticTrainer
from utils.errors import UserError

if TYPE_CHECKING:
    from models.config import LossConfig


def receptive_field(n_layers: int) -> int:
    """The side in pixels of the patch one logit sees: ``n_layers`` 4x4 stride-2 convolutions, then two 4x4
    stride-1 ones (n_layers=3: 70, the paper's 70x70 PatchGAN)."""
    field = 1
    for stride in [1, 1] + [2] * n_layers:  # from the logit back to the image
        field = (field - 1) * stride + 4
    return field


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchGAN(nn.Module):
    """C → ndf (4x4, stride 2, LeakyReLU 0.2), then n_layers − 1 more stride-2 layers doubling the width up to
    8·ndf, one stride-1 layer, and a stride-1 convolution to one logit per patch: (B, C, H, W) → (B, 1, H', W')."""

    def __init__(self, channels: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            wider = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width, wider, 4, stride, 1, bias=False), _norm(wider), nn.LeakyReLU(0.2)]
            width = wider
        self.net = nn.Sequential(*layers, nn.Conv2d(width, 1, 4, 1, 1))
        for m in self.modules():  # DCGAN's initialisation, as taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss from its logits on real and reconstructed images."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def non_saturating_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's cross-entropy (the original GAN's, taming's "vanilla") from its logits."""
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


DISC_LOSSES = {"hinge": hinge_loss, "non_saturating": non_saturating_loss}


def adaptive_weight(rec: torch.Tensor, g_adv: torch.Tensor, last_layer: torch.Tensor,
                    weight: float) -> torch.Tensor:
    """λ (see the module's docstring), fp32, finite, detached; the same on every process under DDP."""
    grads = torch.autograd.grad([rec], [last_layer], retain_graph=True)[0].float()
    adv = torch.autograd.grad([g_adv], [last_layer], retain_graph=True)[0].float()
    both = torch.stack([grads, adv])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(both)
        both = both / torch.distributed.get_world_size()
    lam = torch.linalg.vector_norm(both[0]) / (torch.linalg.vector_norm(both[1]) + 1e-4)
    lam = torch.nan_to_num(lam, nan=0.0, posinf=1e4).clamp(0.0, 1e4)
    return (lam * weight).detach()


class ImageDiscriminator(nn.Module):
    """The discriminator of ``loss.disc_*`` on images of shape (C, H, W), with its trainer."""

    missing_state = "the run was trained without a discriminator; resume with loss.disc_weight=0"

    def __init__(self, loss: LossConfig, img_shape: tuple[int, int, int]):
        super().__init__()
        c, h, w = img_shape
        field = receptive_field(loss.disc_layers)
        if field > min(h, w):
            fits = [n for n in range(1, loss.disc_layers) if receptive_field(n) <= min(h, w)]
            fix = (f"use loss.disc_layers={fits[-1]} ({receptive_field(fits[-1])} px patches) or larger images"
                   if fits else "use images of at least 16 px")
            raise UserError(f"loss.disc_layers={loss.disc_layers} gives the discriminator {field}x{field} px "
                            f"patches, larger than the {h}x{w} images, so it would judge whole padded images, "
                            f"not patches: {fix}")
        self.net = PatchGAN(c, loss.disc_channels, loss.disc_layers)
        self.trainer = CriticTrainer(self.net, loss.disc_lr)
        self.weight, self.start, self.disc_loss = loss.disc_weight, loss.disc_start, DISC_LOSSES[loss.disc_loss]
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._step: int | None = None

    def on(self, step: int | None) -> bool:
        """Whether the adversarial term is on at ``step`` (None: fully trained)."""
        return step is None or step >= self.start

    def generator_terms(self, x: torch.Tensor, x_hat: torch.Tensor, rec: torch.Tensor, last_layer: torch.Tensor,
                        step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(λ · g_adv, the terms to log) for images x and reconstructions x_hat in [0, 1], fp32; keeps them for
        ``after_step``."""
        self._seen.append((x.detach(), x_hat.detach()))
        self._step = step
        g_adv = -self.net(2 * x_hat - 1).mean()  # images in [-1, 1], as taming's
        if self.on(step):
            lam = adaptive_weight(rec, g_adv, last_layer, self.weight)
        else:
            lam = torch.zeros((), device=x.device)
        return lam * g_adv, {"g_adv": g_adv.detach(), "d_weight": lam}

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def after_step(self, accelerator, bad: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step of the discriminator on the step's images and reconstructions (nothing before the start)."""
        seen, self._seen = self._seen, []
        if not seen or not self.on(self._step):
            return {}
        x, x_hat = (torch.cat(parts).float() for parts in zip(*seen))

        def loss_fn() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            real, fake = self.net(2 * x - 1), self.net(2 * x_hat - 1)
            loss = self.disc_loss(real, fake)
            return loss, {"disc_loss": loss.detach(), "logits_real": real.detach().mean(),
                          "logits_fake": fake.detach().mean()}
        return self.trainer.step(accelerator, bad, loss_fn)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.trainer.state_tensors()

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.trainer.load_state_tensors(state)


def adversarial_terms(vae, x: torch.Tensor, out: torch.Tensor, rec: torch.Tensor, loss: torch.Tensor,
                      step: int | None) -> dict[str, torch.Tensor]:
    """The objectives' hook: the terms with the adversarial one added to ``loss``, for images x, the decoder's
    output ``out`` and the reconstruction loss ``rec`` (a scalar) the objective trains on; nothing without a
    discriminator, and nothing in evaluation (the term is no part of log p(x))."""
    disc = getattr(vae, "discriminator", None)
    if disc is None or not disc.training or not torch.is_grad_enabled():
        return {}
    term, logs = disc.generator_terms(x, vae.likelihood.mean(out), rec, vae.decoder.last_layer, step)
    return {**logs, "loss": loss + term}


def build_discriminator(loss: LossConfig, img_shape: tuple[int, int, int],
                        decoder: nn.Module) -> ImageDiscriminator | None:
    """The image discriminator of ``loss.disc_*``, or None with ``loss.disc_weight`` = 0; built last, so that
    the other parts' initial weights are those of a run without it."""
    if loss.disc_weight <= 0:
        return None
    if not hasattr(decoder, "last_layer"):
        raise UserError(f"loss.disc_weight={loss.disc_weight:g} balances the adversarial term on the decoder's last "
                        f"layer, and the {type(decoder).__name__} does not name one: use another model.net, or "
                        f"drop disc_weight")
    return ImageDiscriminator(loss, img_shape)
