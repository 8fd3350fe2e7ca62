"""The disentangling regularisers against known answers: β-TCVAE's decomposition of the KL (by hand, against the
closed form of a Gaussian aggregate posterior, and against the authors' stratified weights), FactorVAE's critic
(against the total correlation of correlated Gaussians; its own optimizer, checkpointed so a resume is exact),
DIP-VAE's covariance penalties, and short real runs of each."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import train, train_cli
from models.priors import StandardNormal
from models.regularisers import (
    REGULARISERS,
    FactorVAE,
    PosteriorSample,
    covariance,
    log_importance_weights,
    permute_dims,
    tc_parts,
)
from models.vae import VAE
from utils.config import load_config
from utils.training.run_folder import read_metrics


def random_codes(b: int, d: int, seed: int = 0) -> PosteriorSample:
    g = torch.Generator().manual_seed(seed)
    mu, logvar = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g) * 0.5
    return PosteriorSample(mu + torch.randn(b, d, generator=g) * torch.exp(0.5 * logvar), mu, logvar)


def normal_pdf(z: float, mu: float, logvar: float) -> float:
    return math.exp(-0.5 * ((z - mu) ** 2 / math.exp(logvar) + logvar + math.log(2 * math.pi)))


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_total_correlation_parts_by_hand(estimator):
    """q(z_i) ≈ Σ_j r_ij q(z_i|x_j) and Π_d Σ_j r_ij q(z_id|x_j), with the weights r written out, in float64."""
    b, d, n = 5, 3, 40
    codes = random_codes(b, d)
    m = b - 1
    parts = tc_parts(codes, StandardNormal(d), n, estimator)
    z, mu, lv = (t.double().tolist() for t in (codes.z, codes.mu, codes.logvar))
    for i in range(b):
        r = [1 / (n * b)] * b if estimator == "mws" else [
            1 / n if j == i else (n - m) / (n * m) if j == (i + 1) % b else 1 / m for j in range(b)]
        q_joint = sum(r[j] * math.prod(normal_pdf(z[i][k], mu[j][k], lv[j][k]) for k in range(d)) for j in range(b))
        q_marg = [sum(r[j] * normal_pdf(z[i][k], mu[j][k], lv[j][k]) for j in range(b)) for k in range(d)]
        log_qzx = sum(math.log(normal_pdf(z[i][k], mu[i][k], lv[i][k])) for k in range(d))
        log_pz = sum(math.log(normal_pdf(z[i][k], 0.0, 0.0)) for k in range(d))
        assert parts["mi"][i].item() == pytest.approx(log_qzx - math.log(q_joint), abs=1e-4)
        assert parts["tc"][i].item() == pytest.approx(math.log(q_joint) - sum(map(math.log, q_marg)), abs=1e-4)
        assert parts["dwkl"][i].item() == pytest.approx(sum(map(math.log, q_marg)) - log_pz, abs=1e-4)


def test_stratified_weights_are_the_authors_with_the_diagonal_stride():
    """The authors' construction (beta-tcvae, vae_quant.py): fill 1/M, then 1/N and (N−M)/(NM) every M+1
    entries of the flattened matrix from offsets 0 and 1, then one more (N−M)/(NM). With M + 1 = B that stride
    walks down column 0; with the diagonal stride B + 1 (and the last entry in row M) it is ours exactly."""
    b, n = 6, 100
    m = b - 1

    def authors(stride: int, last_row: int) -> torch.Tensor:
        w = torch.full((b, b), 1 / m, dtype=torch.float64)
        w.view(-1)[::stride] = 1 / n
        w.view(-1)[1::stride] = (n - m) / (n * m)
        w[last_row, 0] = (n - m) / (n * m)
        return w

    ours = log_importance_weights(b, n, "mss").double().exp()
    torch.testing.assert_close(ours, authors(m + 2, m), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.sum(1), torch.ones(b, dtype=torch.float64), rtol=1e-6, atol=0)
    published = authors(m + 1, m - 1)
    assert (published[:, 0] != 1 / m).all() and not torch.allclose(published.diagonal()[1:],
                                                                     torch.full((m,), 1 / n, dtype=torch.float64))


@pytest.mark.parametrize("mixing", ["independent", "correlated"])
def test_decomposition_matches_a_gaussian_aggregate_posterior(mixing):
    """Posteriors N(mu_j, v I) with mu_j ~ N(0, (1 − v) A Aᵀ): the aggregate posterior is N(0, S),
    S = (1 − v) A Aᵀ + v I, whose mutual information, total correlation and dimension-wise KL to N(0, I) have
    closed forms."""
    torch.manual_seed(0)
    a = torch.eye(3) if mixing == "independent" else torch.tensor([[1.0, 0, 0], [0.95, 0.3, 0], [0, 0, 1]])
    b, v = 1500, 0.3
    mu = torch.randn(b, 3) @ a.T * math.sqrt(1 - v)
    logvar = torch.full((b, 3), math.log(v))
    codes = PosteriorSample(mu + torch.randn(b, 3) * math.sqrt(v), mu, logvar)
    s = (1 - v) * a @ a.T + v * torch.eye(3)
    diag = torch.diagonal(s)
    true = {"mi": 0.5 * (torch.logdet(s) - 3 * math.log(v)).item(),
            "tc": 0.5 * (diag.log().sum() - torch.logdet(s)).item(),
            "dwkl": 0.5 * (diag - 1 - diag.log()).sum().item()}
    mss = {k: v.mean().item() for k, v in tc_parts(codes, StandardNormal(3), b, "mss").items()}
    for k in true:
        assert mss[k] == pytest.approx(true[k], abs=0.04), k
    mws = {k: v.mean().item() for k, v in tc_parts(codes, StandardNormal(3), b, "mws").items()}
    assert mws["tc"] - 2 * math.log(b) == pytest.approx(true["tc"], abs=0.04)  # offset by (D − 1) log N
    assert sum(mws.values()) == pytest.approx(sum(mss.values()), abs=1e-3)  # both sum to log q(z|x) − log p(z)
    if mixing == "correlated":
        assert true["tc"] > 0.25  # far from the independent case, and estimated within 0.04


def tcvae(beta: float, estimator: str = "mss", n: int = 1000) -> VAE:
    cfg = load_config(None, ["loss.regulariser=tcvae", f"loss.beta={beta}", f"loss.tc_estimator={estimator}",
                             f"loss.tc_dataset_size={n}", "model.z_dim=4", "model.hidden=16"])
    return VAE(cfg.model, cfg.loss, (1, 6, 6), cfg.train.batch_size)


def test_tcvae_loss_is_kl_plus_beta_minus_one_tc():
    x = torch.rand(16, 1, 6, 6)
    torch.manual_seed(3)
    t1 = tcvae(1.0)(x, step=None)
    torch.manual_seed(3)
    t6 = tcvae(6.0)(x, step=None)
    assert {"mi", "tc", "dwkl"} <= set(t6)
    assert t1["loss"].item() == pytest.approx((t1["rec"] + t1["kl"]).item(), rel=1e-6)  # β = 1: the VAE
    assert t6["loss"].item() == pytest.approx((t6["rec"] + t6["kl"] + 5 * t6["tc"]).item(), rel=1e-6)


def test_dip_penalties_by_hand():
    codes = random_codes(64, 4, seed=1)
    c = torch.tensor(np.cov(codes.mu.double().numpy().T, bias=True))
    torch.testing.assert_close(covariance(codes.mu).double(), c, rtol=1e-5, atol=1e-6)
    cfg = load_config(None, ["loss.regulariser=dip_i", "loss.dip_lambda_od=3", "loss.dip_lambda_d=7"]).loss
    kl = torch.rand(64)
    for name, cov in (("dip_i", c), ("dip_ii", c + torch.diag(codes.logvar.double().exp().mean(0)))):
        penalty, parts = REGULARISERS[name].load()(cfg)(kl, codes, StandardNormal(4), None)
        off = (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()).item()
        on = (torch.diagonal(cov) - 1).pow(2).sum().item()
        assert parts["dip_off_diagonal"].item() == pytest.approx(off, rel=1e-4)
        assert penalty.item() == pytest.approx(kl.mean().item() + 3 * off + 7 * on, rel=1e-4)
    # whitened means have the identity as covariance: DIP-VAE-I adds nothing
    w = codes.mu - codes.mu.mean(0)
    w = w @ torch.linalg.inv(torch.linalg.cholesky(covariance(w))).T
    penalty, _ = REGULARISERS["dip_i"].load()(cfg)(kl, PosteriorSample(w, w, codes.logvar), StandardNormal(4), None)
    assert penalty.item() == pytest.approx(kl.mean().item(), abs=1e-4)


def test_permuting_dimensions_keeps_each_marginal():
    z = torch.randn(50, 3)
    p = permute_dims(z)
    assert all(torch.equal(p[:, d].sort().values, z[:, d].sort().values) for d in range(3))
    assert not torch.equal(p, z)


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_factor_vae_critic_estimates_the_total_correlation(rho):
    """Codes (e1, ρ e1 + √(1−ρ²) e2): TC = −½ log(1 − ρ²) (0.83 nats at ρ = 0.9, 0 when independent). The
    density-ratio estimate mean(logit_0 − logit_1) of a critic trained by ``after_step`` approaches it from
    below; the VAE's loss is β·KL + γ·TC."""
    torch.manual_seed(0)
    cfg = load_config(None, ["loss.regulariser=factorvae", "loss.factor_critic_hidden=[64, 64]",
                             "loss.factor_critic_lr=1e-3", "loss.factor_gamma=7", "model.z_dim=2"])
    reg, one = FactorVAE(cfg.loss, 2), types.SimpleNamespace(num_processes=1)
    for _ in range(400):
        e = torch.randn(256, 2)
        z = torch.stack([e[:, 0], rho * e[:, 0] + math.sqrt(1 - rho**2) * e[:, 1]], 1)
        kl = torch.rand(256)
        penalty, parts = reg(kl, PosteriorSample(z, z, z), StandardNormal(2), None)
        logged = reg.after_step(one, torch.zeros(()))
    penalty, parts = reg(kl, PosteriorSample(z, z, z), StandardNormal(2), None)
    logits = reg.critic(z)
    assert parts["tc"].item() == pytest.approx((logits[:, 0] - logits[:, 1]).mean().item(), rel=1e-5, abs=1e-6)
    assert penalty.item() == pytest.approx(kl.mean().item() + 7 * parts["tc"].item(), rel=1e-5)
    if rho == 0:
        assert abs(parts["tc"].item()) < 0.05 and logged["critic_accuracy"].item() < 0.6
    else:
        assert 0.5 < parts["tc"].item() < -0.5 * math.log(1 - rho**2) + 0.1
        assert logged["critic_accuracy"].item() > 0.7
    # a step the VAE skipped is skipped by the critic too
    before = [p.detach().clone() for p in reg.critic.parameters()]
    reg.after_step(one, torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(before, reg.critic.parameters()))


def test_factor_vae_critic_is_not_trained_by_the_vae_optimizer_and_resumes_exactly(tmp_path, real_data):
    cfg = load_config(None, ["loss.regulariser=factorvae", "loss.factor_critic_hidden=[8]"])
    vae = VAE(cfg.model, cfg.loss, (1, 28, 28))
    critic = {id(p) for p in vae.regulariser.critic.parameters()}
    assert critic and not critic & {id(p) for p in vae.trained_parameters()}
    assert len(vae.trained_parameters()) + len(critic) == len(list(vae.parameters()))
    common = ["loss.regulariser=factorvae", "loss.factor_critic_hidden=[32, 32]", "model.hidden=32",
              "train.save_every=3", "train.eval_every=6"]
    train(tmp_path / "full", extra=[*common, "train.steps=6"])
    train(tmp_path / "part", extra=[*common, "train.steps=3"])
    assert (tmp_path / "part" / "checkpoints" / "step_0000003" / "regulariser.safetensors").is_file()
    res = train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=6"])
    assert res.returncode == 0, res.stderr[-2000:]
    full, part = read_metrics(tmp_path / "full", "train"), read_metrics(tmp_path / "part", "train")
    assert [(r["step"], r["loss"], r["critic_loss"]) for r in full] == [
        (r["step"], r["loss"], r["critic_loss"]) for r in part]
    assert {"tc", "critic_loss", "critic_accuracy"} <= set(full[0])
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert any(k.startswith("regulariser.critic.") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("regulariser, extra, logged", [
    ("tcvae", ["loss.beta=6"], {"mi", "tc", "dwkl"}),
    ("dip_ii", ["loss.dip_lambda_od=5", "loss.dip_lambda_d=5"], {"dip_off_diagonal", "dip_diagonal"}),
])
def test_short_runs_log_each_part(regulariser, extra, logged, tmp_path, real_data):
    run = tmp_path / "run"
    train(run, extra=["train.steps=30", "model.hidden=64", "model.z_dim=6", f"loss.regulariser={regulariser}",
                      *extra])
    rows = read_metrics(run, "train")
    assert logged <= set(rows[0]) and all(math.isfinite(r[k]) for r in rows for k in logged)
    assert rows[-1]["loss"] < rows[0]["loss"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if regulariser == "tcvae":
        assert cfg["loss"]["tc_dataset_size"] == 60000  # N filled in from the training set
        assert rows[0]["kl_weight"] == 1.0
