"""Priors p(z), chosen by ``model.prior``.

Training, ``evaluate.py`` and ``sample.py`` all ask the model's one prior object
for log p(z) and for samples, so a prior other than the standard normal (a
mixture of learned pseudo-input posteriors, say) is used consistently by the
objective, the likelihood bounds and the sample grids. A prior with a closed-form
KL to a diagonal Gaussian posterior returns it from ``kl_per_dim``; any other
returns None, and the objective then estimates the KL by Monte Carlo,
log q(z|x) − log p(z) at the sampled z.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.gaussian import HALF_LOG_2PI, standard_normal_log_density
from models.prior_rules import PRIORS, PriorRules, StandardNormalRules, VampPriorRules

if TYPE_CHECKING:
    from models.config import ModelConfig

class Prior(PriorRules, nn.Module):
    """p(z) over codes of size ``z_dim``; what it states for the config (``conditional``, ``learned``) is its
    rules class's (prior_rules.py)."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim

    @classmethod
    def from_config(cls, m: ModelConfig, img_shape: tuple[int, int, int]) -> Prior:
        return cls(m.z_dim)

    def bind(self, encoder: nn.Module) -> None:
        """Told the model's encoder (a prior made of posteriors needs it); kept out of this module's parameters."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) per code, (...,) for z (..., z_dim)."""
        raise NotImplementedError

    def about(self, centre: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """log p(z) (k, B) for k codes per image, z (k, B, z_dim), drawn about each image's posterior mean
        ``centre`` (B, z_dim): the values of ``log_prob``. A prior may use the centres to compute them faster,
        preparing once what every chunk of an image's codes shares (the importance-weighted bounds evaluate
        millions of codes this way)."""
        return self.log_prob

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """n codes (n, z_dim) on ``device`` (default: the generator's, else the CPU), from ``generator`` or the
        device's default one."""
        raise NotImplementedError

    def kl_per_dim(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor | None:
        """KL(q(z|x) || p(z)) per image and dimension (B, z) in closed form, or None where there is none."""
        return None

    def dimension_kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A per-dimension KL for ranking and reporting dimensions (B, z): the closed form where there is one,
        else each dimension's KL to N(0, 1), which a prior without one per dimension leaves as the yardstick."""
        per_dim = self.kl_per_dim(mu, logvar)
        return per_dim if per_dim is not None else StandardNormal(self.z_dim).kl_per_dim(mu, logvar)


class StandardNormal(StandardNormalRules, Prior):
    """N(0, I), the prior of Kingma & Welling (2014)."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_density(z)

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        if device is None and generator is not None:
            device = generator.device
        return torch.randn(n, self.z_dim, generator=generator, device=device)

    def kl_per_dim(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Kingma & Welling 2014, appendix B: −KL = 0.5 · Σ_j (1 + log σ_j² − μ_j² − σ_j²)."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class VampPrior(VampPriorRules, Prior):
    """p(z) = (1/K) Σ_k q(z | u_k): the encoder's posteriors at K learned pseudo-inputs u_k (Tomczak & Welling
    2018). The pseudo-inputs are ``hardtanh(θ, 0, 1)`` of a parameter θ initialised at N(0.05, 0.01²), as in
    the authors' code for binary images; K is ``model.vamp_components``. Its KL to a posterior has no closed
    form, so the objective estimates it by Monte Carlo.
    """

    def __init__(self, z_dim: int, components: int, img_shape: tuple[int, int, int]):
        super().__init__(z_dim)
        self.pseudo = nn.Parameter(torch.randn(components, *img_shape) * 0.01 + 0.05)
        self._encoder: list[nn.Module] = []
        self._table: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # components() kept, see there

    @classmethod
    def from_config(cls, m: ModelConfig, img_shape: tuple[int, int, int]) -> VampPrior:
        return cls(m.z_dim, m.vamp_components, img_shape)

    def bind(self, encoder: nn.Module) -> None:
        self._encoder = [encoder]  # a list: not registered twice in the state dict

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of the K mixture components, each (K, z).

        Without gradients (evaluation, sampling) the table is kept and reused until a parameter or buffer of the
        pseudo-inputs or the encoder changes (in place, as an optimiser step or a loaded state dict does, or by
        moving) or the encoder changes mode: a k = 5000 bound asks for it thousands of times per test set.
        """
        encoder = self._encoder[0]
        key = None
        if not torch.is_grad_enabled() and isinstance(encoder, nn.Module):
            tensors = [self.pseudo, *encoder.parameters(), *encoder.buffers()]
            key = (encoder.training, *((t.data_ptr(), t._version) for t in tensors))
            if self._table is not None and self._table[0] == key:
                return self._table[1]
        mu, logvar = encoder(F.hardtanh(self.pseudo, 0.0, 1.0))
        table = mu.float(), logvar.float()
        self._table = None if key is None else (key, table)
        return table

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        mu, logvar = (t.double() for t in self.components())
        precision = torch.exp(-logvar)                                         # (K, z)
        # log N(z; μ_k, σ_k²) = −½ [Σ_d z_d²/σ²_kd − 2 z_d μ_kd/σ²_kd + μ_kd²/σ²_kd + log σ²_kd] − d·½log 2π, one
        # matrix product of [z², z, 1] (..., 2z+1) with the components' coefficients: no (..., K, z) tensor, and
        # no elementwise pass over the (..., K) result. In float64: the three terms cancel where σ_k is small, and
        # float32 would leave errors of 0.01 nats
        const = (mu.pow(2) * precision + logvar).sum(-1, keepdim=True) + 2 * self.z_dim * HALF_LOG_2PI
        coef = -0.5 * torch.cat([precision, -2.0 * mu * precision, const], -1)  # (K, 2z+1)
        z = z.double()
        feats = torch.cat([z.pow(2), z, torch.ones_like(z[..., :1])], -1)      # (..., 2z+1)
        return logsumexp_floored((feats @ coef.T).float()) - math.log(mu.shape[0])

    def about(self, centre: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``log_prob`` in float32, about four times faster on a CPU than its float64 form. With u = z − c and
        a_k = μ_k − c for the image's centre c, Σ_d (z_d − μ_kd)²/σ²_kd = Σ_d [u_d² − 2 u_d a_kd + a_kd²]/σ²_kd:
        one batched matrix product of [u², u, 1] (B, k, 2z+1) with per-image coefficients (B, K, 2z+1), made
        once here for all chunks of codes. Codes lie near their image's centre, so u is small, and where a_k is
        large the component's density is negligible: no large terms cancel where the sum matters, which
        float32 needs."""
        mu, logvar = self.components()
        c = centre.detach().float()  # the value does not depend on the centre, nor should its gradient
        precision = torch.exp(-logvar)                                            # (K, z)
        a = mu - c.unsqueeze(1)                                                   # (B, K, z)
        const = (a.pow(2) * precision + logvar).sum(-1, keepdim=True) + 2 * self.z_dim * HALF_LOG_2PI
        coef_t = (-0.5 * torch.cat([precision.expand_as(a), -2.0 * a * precision, const], -1)).transpose(1, 2)

        def log_prob(z: torch.Tensor) -> torch.Tensor:
            if z.dim() != 3:
                return self.log_prob(z)
            u = (z.float() - c).transpose(0, 1)                                   # (B, k, z)
            feats = torch.cat([u.pow(2), u, torch.ones_like(u[..., :1])], -1)    # (B, k, 2z+1)
            log_p = logsumexp_floored(torch.bmm(feats, coef_t))                  # (B, k)
            return log_p.transpose(0, 1) - math.log(mu.shape[0])

        return log_prob

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        mu, logvar = self.components()
        where = generator.device if generator is not None else mu.device
        pick = torch.randint(mu.shape[0], (n,), generator=generator, device=where).to(mu.device)
        eps = torch.randn(n, self.z_dim, generator=generator, device=where).to(mu.device)
        z = mu[pick] + eps * torch.exp(0.5 * logvar[pick])
        return z if device is None else z.to(device)


def logsumexp_floored(x: torch.Tensor) -> torch.Tensor:
    """log Σ exp(x) over the last dimension, as torch.logsumexp to float precision, but each term is floored at
    e^-80 of the largest before exp. A code far from most of a mixture's components leaves terms whose exp
    underflows into subnormal floats, which a CPU's exp computes several times slower (the bulk of a
    VampPrior's cost in evaluate.py); terms that small change no float32 sum of which the largest is 1."""
    top = x.amax(-1, keepdim=True)
    return (x - top).clamp_(min=-80.0).exp_().sum(-1).log_() + top.squeeze(-1)


def build_prior(m: ModelConfig, img_shape: tuple[int, int, int]) -> Prior:
    return PRIORS[m.prior].load().from_config(m, img_shape)
