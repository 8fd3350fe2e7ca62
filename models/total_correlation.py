"""β-TCVAE (Chen et al. 2018): the KL's decomposition into index-code mutual information, total correlation and
dimension-wise KL, estimated on the batch by minibatch-weighted or minibatch-stratified sampling."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from models.gaussian import log_normal
from models.priors import Prior
from models.regulariser_base import PosteriorSample, Regulariser
from models.regulariser_rules import TCVAERules
from utils.errors import UserError

if TYPE_CHECKING:
    from models.config import LossConfig

TC_ESTIMATORS = ("mss", "mws")  # see log_importance_weights


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


class TCVAE(TCVAERules, Regulariser):
    """β-TCVAE (Chen et al. 2018): w_t · (KL + (β − 1) · TC), the total correlation weighted by β and the mutual
    information and dimension-wise KL by 1 (the paper's α = γ = 1), with the KL in closed form as
    disentanglement_lib. TC is estimated on the batch each process sees (``loss.tc_estimator``, with the
    training set's size ``loss.tc_dataset_size``); w_t is the warm-up alone. Logs mi, tc and dwkl."""

    def __init__(self, loss: LossConfig):
        super().__init__(loss)
        self.n, self.estimator = loss.tc_dataset_size, loss.tc_estimator
        if self.n < 2:
            raise UserError("loss.tc_dataset_size must be the number of training images (resolving the config fills "
                            "it in when it is 0): set it")

    def kl_weight(self, step: int | None) -> float:
        """w_t, the warm-up from 0 to 1 (β weighs the TC here, not the KL)."""
        return 1.0 if step is None or self.warmup <= 0 else min(1.0, step / self.warmup)

    def forward(self, kl: torch.Tensor, codes: PosteriorSample, prior: Prior,
                step: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {k: v.mean() for k, v in tc_parts(codes, prior, self.n, self.estimator).items()}
        w = self.kl_weight(step)
        return w * (kl.mean() + (self.beta - 1.0) * parts["tc"]), parts
