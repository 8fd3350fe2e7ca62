"""Latent regularisers, chosen by ``loss.regulariser``: the term the objective adds to the reconstruction.

    kl      β_t · KL(q(z|x) || p(z))                          VAE (β = 1), β-VAE (Higgins et al. 2017)
    mmd     β_t · KL(q(z|x) || p(z)) + λ · MMD(q(z) || p(z))   InfoVAE (Zhao et al. 2019); β = 0 is the MMD-VAE
    tcvae      w_t · (KL + (β − 1) · TC)                        β-TCVAE (Chen et al. 2018)
    factorvae  β_t · KL + γ · TC, TC from a critic network         FactorVAE (Kim & Mnih 2018)
    dip_i   β_t · KL + λ_od Σ_i≠j C_ij² + λ_d Σ_i (C_ii − 1)²   DIP-VAE-I (Kumar et al. 2018), C = Cov[E[z|x]]
    dip_ii  as dip_i with C = Cov_q(z)[z]                       DIP-VAE-II

β_t is ``loss.beta`` after the linear warm-up of ``loss.kl_warmup_steps``. The
objective hands each regulariser the per-image KL it already computed (closed
form where the prior has one, else a Monte Carlo estimate), the sampled codes with
their posterior's parameters, and the prior, so a new regulariser is one class and
one ``REGULARISERS`` entry. A regulariser with a network of its own (FactorVAE's
critic) lists it in ``auxiliary_parameters`` (kept out of the VAE's optimizer),
trains it in ``after_step`` and hands its optimizer's state to checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.gaussian import log_normal
from models.priors import Prior
from utils.errors import UserError

if TYPE_CHECKING:
    from models.config import LossConfig

IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def imq_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inverse multiquadric C / (C + ||a − b||²), summed over the scales of WAE (Tolstikhin et al. 2018),
    C = 2·d·s: bandwidths set for a N(0, I) prior in d dimensions. (n, m) for a (n, d), b (m, d)."""
    d2 = torch.cdist(a, b).pow(2)
    d = a.shape[1]
    return sum((2.0 * d * s) / (2.0 * d * s + d2) for s in IMQ_SCALES)


def rbf_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(−||a − b||² / 2d), (n, m)."""
    return torch.exp(-torch.cdist(a, b).pow(2) / (2.0 * a.shape[1]))


KERNELS = {"imq": imq_kernel, "rbf": rbf_kernel}
TC_ESTIMATORS = ("mss", "mws")  # see log_importance_weights


def mmd(z: torch.Tensor, prior: torch.Tensor, kind: str = "imq") -> torch.Tensor:
    """Unbiased estimate of MMD²(q(z), p(z)) from samples z ~ q(z) and prior ~ p(z), both (n, d).

    Zhao, Song & Ermon 2019 (InfoVAE): a divergence between the *aggregate*
    posterior and the prior, where the KL compares each image's posterior.
    """
    kernel, n = KERNELS[kind], z.shape[0]
    off = 1.0 - torch.eye(n, device=z.device, dtype=z.dtype)
    k_zz = (kernel(z, z) * off).sum() / (n * (n - 1))
    k_pp = (kernel(prior, prior) * off).sum() / (n * (n - 1))
    return k_zz + k_pp - 2.0 * kernel(z, prior).mean()


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
    ``check`` (its keys' rules) and ``complete_config`` (values it takes from the training set)."""

    plain_kl = False
    min_batch = 1
    accumulates = True

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        """Refuse, in one line, ``loss`` keys that cannot take effect with this regulariser."""
        if loss.mmd_weight > 0:
            raise UserError(f"loss.mmd_weight={loss.mmd_weight:g} has no effect with loss.regulariser="
                            f"{loss.regulariser}: set loss.regulariser=mmd, or drop mmd_weight")

    @classmethod
    def complete_config(cls, loss: LossConfig, train_size: int) -> None:
        """Fill keys left at 0 ('from the data') once the training set is known; written into config.yaml."""

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


class KL(Regulariser):
    """β_t · KL(q(z|x) || p(z)) per image, averaged over the batch."""

    plain_kl = True


class MMD(Regulariser):
    """β_t · KL + ``loss.mmd_weight`` · MMD(q(z) || p(z)) with ``loss.mmd_kernel``, codes z against prior draws."""

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        if loss.mmd_weight == 0:
            raise UserError("loss.regulariser=mmd needs loss.mmd_weight > 0 (100 suits MNIST): set it, or use "
                            "loss.regulariser=kl")

    def __init__(self, loss: LossConfig):
        super().__init__(loss)
        self.weight, self.kernel = loss.mmd_weight, loss.mmd_kernel

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, _ = super().forward(kl, codes, prior, step)
        z = codes.z
        value = mmd(z, prior.sample(len(z), device=z.device).to(z.dtype), self.kernel)
        return penalty + self.weight * value, {"mmd": value}


def covariance(x: torch.Tensor) -> torch.Tensor:
    """E[x xᵀ] − E[x] E[x]ᵀ over the batch (the biased estimate, as disentanglement_lib), (d, d) for x (B, d)."""
    centred = x - x.mean(0)
    return centred.T @ centred / len(x)


class DIP(Regulariser):
    """β_t · KL + λ_od · Σ_i≠j C_ij² + λ_d · Σ_i (C_ii − 1)² (Kumar et al. 2018): pushes a covariance of the
    codes towards the identity, the prior's. DIP-VAE-I takes C = Cov[E_q[z|x]] (the means' covariance),
    DIP-VAE-II C = Cov_q(z)[z] = E[Σ(x)] + Cov[E_q[z|x]]; both over the batch, as disentanglement_lib."""

    second_moment = False
    min_batch = 2

    def __init__(self, loss: LossConfig):
        super().__init__(loss)
        self.lambda_od, self.lambda_d = loss.dip_lambda_od, loss.dip_lambda_d

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, _ = super().forward(kl, codes, prior, step)
        c = covariance(codes.mu)
        if self.second_moment:
            c = c + torch.diag(codes.logvar.exp().mean(0))
        diag = torch.diagonal(c)
        off = (c.pow(2).sum() - diag.pow(2).sum())
        on = (diag - 1).pow(2).sum()
        return penalty + self.lambda_od * off + self.lambda_d * on, {"dip_off_diagonal": off, "dip_diagonal": on}


class DIPII(DIP):
    """DIP-VAE-II: the aggregate posterior's covariance."""

    second_moment = True


def log_q_matrix(codes: PosteriorSample) -> torch.Tensor:
    """log q(z_i,d | x_j) for every code i and posterior j of the batch, per dimension d: (B, B, z)."""
    return log_normal(codes.z[:, None], codes.mu[None], codes.logvar[None])


def log_importance_weights(b: int, n: int, estimator: str, device: torch.device | None = None) -> torch.Tensor:
    """log r_ij, the weight of posterior j in the estimate q(z_i) ≈ Σ_j r_ij q(z_i|x_j), (B, B), for a batch of
    b drawn from n training images (Chen et al. 2018, appendix C).

    mws (minibatch-weighted sampling): r_ij = 1/(n·b), as the paper writes it; log q(z) is then low by log n,
        a constant, so the gradients are right and the logged parts are offset.
    mss (minibatch-stratified sampling): r_ii = 1/n, one other posterior (j = i + 1, cyclically) (n − m)/(n·m)
        and the rest 1/m, m = b − 1; each row sums to 1. The authors' code (beta-tcvae, vae_quant.py) strides
        the flattened matrix by m + 1 = b, which walks down column 0 instead of the diagonal (a known bug,
        reported in its pull request #1): its 1/n weights every code's first posterior instead of its own.
        This is the matrix that code means, with the diagonal stride b + 1.
    """
    if estimator == "mws":
        return torch.full((b, b), -math.log(n * b), device=device)
    m = b - 1
    w = torch.full((b, b), 1.0 / m, device=device, dtype=torch.float64)
    idx = torch.arange(b, device=device)
    w[idx, idx] = 1.0 / n
    w[idx, (idx + 1) % b] = (n - m) / (n * m)
    return w.log().float()


def tc_parts(codes: PosteriorSample, prior: Prior, n: int, estimator: str) -> dict[str, torch.Tensor]:
    """The KL's three parts per code (B,), Chen et al. 2018: index-code mutual information
    log q(z|x) − log q(z), total correlation log q(z) − log Π_d q(z_d) and dimension-wise KL
    log Π_d q(z_d) − log p(z). They sum to the one-sample estimate log q(z|x) − log p(z) exactly."""
    lq = log_q_matrix(codes)                                        # (B, B, z)
    lw = log_importance_weights(len(lq), n, estimator, lq.device)  # (B, B)
    log_qz = torch.logsumexp(lw + lq.sum(2), 1)
    log_prod = torch.logsumexp(lw[:, :, None] + lq, 1).sum(1)
    log_qzx = torch.diagonal(lq.sum(2))
    log_pz = prior.log_prob(codes.z)
    return {"mi": log_qzx - log_qz, "tc": log_qz - log_prod, "dwkl": log_prod - log_pz}


class TCVAE(Regulariser):
    """β-TCVAE (Chen et al. 2018): w_t · (KL + (β − 1) · TC), the total correlation weighted by β and the mutual
    information and dimension-wise KL by 1 (the paper's α = γ = 1), with the KL in closed form as
    disentanglement_lib. TC is estimated on the batch each process sees (``loss.tc_estimator``, with the
    training set's size ``loss.tc_dataset_size``); w_t is the warm-up alone. Logs mi, tc and dwkl."""

    min_batch = 2

    @classmethod
    def complete_config(cls, loss: LossConfig, train_size: int) -> None:
        if loss.tc_dataset_size == 0:
            loss.tc_dataset_size = train_size  # evaluation and resume then use the same N

    def __init__(self, loss: LossConfig):
        super().__init__(loss)
        self.n, self.estimator = loss.tc_dataset_size, loss.tc_estimator
        if self.n < 2:
            raise UserError("loss.tc_dataset_size must be the number of training images (the trainer fills it in "
                            "when it is 0): set it")

    def kl_weight(self, step: int | None) -> float:
        """w_t, the warm-up from 0 to 1 (β weighs the TC here, not the KL)."""
        return 1.0 if step is None or self.warmup <= 0 else min(1.0, step / self.warmup)

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {k: v.mean() for k, v in tc_parts(codes, prior, self.n, self.estimator).items()}
        w = self.kl_weight(step)
        return w * (kl.mean() + (self.beta - 1.0) * parts["tc"]), parts


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Each column of z (B, d) shuffled on its own: samples of Π_d q(z_d) from samples of q(z)."""
    order = torch.argsort(torch.rand(z.shape, device=z.device), dim=0)
    return torch.gather(z, 0, order)


class Critic(nn.Module):
    """Tells codes z ~ q(z) (class 0) from permuted codes (class 1): an MLP with LeakyReLU(0.2), two logits."""

    def __init__(self, z_dim: int, hidden: list[int]):
        super().__init__()
        sizes = [z_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class FactorVAE(Regulariser):
    """β_t · KL + γ · TC (Kim & Mnih 2018), TC = KL(q(z) ‖ Π_d q(z_d)) estimated by the density-ratio trick:
    mean(logit_0 − logit_1) of a critic trained to tell codes from permuted codes. The critic is trained after
    each VAE step on that step's codes, detached, and their permutation (disentanglement_lib's one-batch
    variant; the paper permutes a second batch), with its own Adam (lr ``loss.factor_critic_lr``, β = (0.5,
    0.9), as the paper). Under several processes its gradients are averaged over them, so every process
    keeps the same critic. Logs tc, critic_loss and critic_accuracy."""

    min_batch = 2
    accumulates = False  # the critic trains on each step's whole batch of codes

    def __init__(self, loss: LossConfig, z_dim: int):
        super().__init__(loss)
        self.gamma = loss.factor_gamma
        self.critic = Critic(z_dim, loss.factor_critic_hidden)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=loss.factor_critic_lr,
                                                 betas=(0.5, 0.9), fused=True)
        self._codes: torch.Tensor | None = None

    @classmethod
    def from_config(cls, loss: LossConfig, z_dim: int) -> FactorVAE:
        return cls(loss, z_dim)

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        penalty, _ = super().forward(kl, codes, prior, step)
        logits = self.critic(codes.z)
        tc = (logits[:, 0] - logits[:, 1]).mean()
        if self.training:
            self._codes = codes.z.detach()
        return penalty + self.gamma * tc, {"tc": tc}

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    def after_step(self, accelerator, bad: torch.Tensor) -> dict[str, torch.Tensor]:
        z, self._codes = self._codes, None
        self.critic_optimizer.zero_grad(set_to_none=True)  # drops what the VAE's backward left on the critic
        with torch.autocast(device_type=z.device.type, enabled=False):
            real, fake = self.critic(z.float()), self.critic(permute_dims(z.float()))
            ones = torch.ones(len(z), dtype=torch.long, device=z.device)
            loss = 0.5 * (F.cross_entropy(real, 0 * ones) + F.cross_entropy(fake, ones))
        loss.backward()
        if accelerator.num_processes > 1:
            for p in self.critic.parameters():
                p.grad = accelerator.reduce(p.grad, "mean")
        # skipped on the device, as the VAE's step: when the VAE's step was, or the critic's loss is not finite
        self.critic_optimizer.found_inf = ((bad > 0) | ~torch.isfinite(loss)).float()
        self.critic_optimizer.step()
        accuracy = 0.5 * ((real.argmax(1) == 0).float().mean() + (fake.argmax(1) == 1).float().mean())
        return {"critic_loss": loss.detach(), "critic_accuracy": accuracy}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, st in self.critic_optimizer.state_dict()["state"].items() for k, v in st.items()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        own = self.critic_optimizer.state_dict()
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in state.items():
            i, k = key.split(".", 1)
            moments.setdefault(int(i), {})[k] = v
        self.critic_optimizer.load_state_dict({"state": moments, "param_groups": own["param_groups"]})


REGULARISERS: dict[str, type[Regulariser]] = {
    "kl": KL,
    "mmd": MMD,
    "tcvae": TCVAE,
    "factorvae": FactorVAE,
    "dip_i": DIP,
    "dip_ii": DIPII,
}


def build_regulariser(loss: LossConfig, z_dim: int) -> Regulariser:
    return REGULARISERS[loss.regulariser].from_config(loss, z_dim)
