"""Loss terms against values derived by hand on fixed small batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.likelihoods import (
    AveragedMSE,
    Bernoulli,
    FixedGaussian,
    LearnedSigma,
    OptimalSigma,
    PerPixelSigma,
    softclip_log_sigma,
)
from models.priors import StandardNormal
from models.regularisers import mmd
from models.vae import VAE
from utils.config import load_config

LOG_2PI = math.log(2 * math.pi)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 6, 5, generator=g)           # data in [0, 1]
    out = torch.randn(4, 1, 6, 5, generator=g) * 2.0  # raw decoder outputs (logits / pre-sigmoid means)
    return x, out


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return StandardNormal(mu.shape[1]).kl_per_dim(mu, logvar).sum(1)


def test_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g) * 0.5
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(200_000, 3, 4, generator=g)  # samples from q(z|x), (S, B, z)
    log_q = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    mc = (log_q - log_p).double()
    stderr = mc.std(0) / math.sqrt(mc.shape[0])
    assert torch.all((kl_normal(mu, logvar).double() - mc.mean(0)).abs() < 4 * stderr)
    assert torch.allclose(kl_normal(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))


def test_gaussian_nll_at_sigma_one(batch):
    x, out = batch
    d = x[0].numel()
    sse = (x - torch.sigmoid(out)).pow(2).flatten(1).sum(1)
    terms = FixedGaussian(1.0)(x, out)
    assert torch.allclose(terms.nll, 0.5 * sse + 0.5 * d * LOG_2PI)
    assert torch.equal(terms.rec, terms.nll)


def test_gaussian_nll_at_other_sigma(batch):
    x, out = batch
    d, s = x[0].numel(), 0.3
    sse = (x - torch.sigmoid(out)).pow(2).flatten(1).sum(1)
    assert torch.allclose(FixedGaussian(s)(x, out).nll, 0.5 * sse / s**2 + d * math.log(s) + 0.5 * d * LOG_2PI)


def test_bernoulli_is_summed_bce(batch):
    x, out = batch
    p = torch.sigmoid(out)
    by_hand = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(Bernoulli()(x, out).nll, by_hand, atol=1e-4)
    # k outputs per image (the importance-weighted bounds): the contraction without copies is the same sum,
    # for grey levels as for binary pixels, and a likelihood without its own takes the k-fold copy
    out_k = torch.randn(3 * 4, 1, 6, 5, generator=torch.Generator().manual_seed(1)) * 8.0
    for images in (x, torch.bernoulli(x)):
        copies = images.repeat(3, 1, 1, 1)
        assert torch.allclose(Bernoulli().terms_k(images, out_k).nll, Bernoulli()(copies, out_k).nll, atol=1e-4)
        sigma = FixedGaussian(0.3)
        assert torch.equal(sigma.terms_k(images, out_k).nll, sigma(copies, out_k).nll)


def test_optimal_sigma_is_batch_rmse(batch):
    x, out = batch
    rmse = (x - torch.sigmoid(out)).pow(2).mean().sqrt().item()
    terms = OptimalSigma()(x, out)
    # σ = RMSE through the smooth floor: log σ = -6 + log(1 + exp(log RMSE + 6)), a 0.6% shift at RMSE 0.4
    ls = -6 + math.log1p(math.exp(math.log(rmse) + 6))
    assert terms.log_sigma.item() == pytest.approx(ls, rel=1e-5)
    assert terms.log_sigma.exp().item() == pytest.approx(rmse, rel=1e-2)
    d = x[0].numel()
    sse = (x - torch.sigmoid(out)).pow(2).flatten(1).sum(1)
    assert torch.allclose(terms.nll, 0.5 * sse * math.exp(-2 * ls) + d * ls + 0.5 * d * LOG_2PI)


def test_mse_baseline_is_mean_squared_error(batch):
    x, out = batch
    terms = AveragedMSE()(x, out)
    assert torch.allclose(terms.rec.mean(), F.mse_loss(torch.sigmoid(out), x))
    # its reported NLL is the Gaussian with the implied σ² = D/2
    d = x[0].numel()
    assert torch.allclose(terms.log_sigma.exp(), torch.tensor(math.sqrt(d / 2)))


def test_mse_batch_is_the_reference_mse_vae(batch):
    """The σ-VAE authors' mse_vae: MSELoss() over batch and pixels plus the KL summed over the batch. Our loss
    averages every term over the batch, so it is theirs divided by B."""
    x, out = batch
    cfg = load_config(None, ["model.likelihood=mse_batch", "train.batch_size=4", "model.z_dim=3", "model.hidden=8"])
    model = VAE(cfg.model, cfg.loss, (1, 6, 5), cfg.train.batch_size)
    torch.manual_seed(0)
    t = model(x, step=0)
    torch.manual_seed(0)
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    reference = F.mse_loss(model.decode(z), x) - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    assert (t["loss"] * len(x)).item() == pytest.approx(reference.item(), rel=1e-5)
    d = x[0].numel()
    assert t["sigma"].item() == pytest.approx(math.sqrt(4 * d / 2), rel=1e-6)  # implied σ² = B·D/2


def test_optimal_sigma_gradient_matches_the_reference(batch):
    """The authors' optimal σ is not detached; with the soft floor its gradient is not zero."""
    x, out = batch
    mine = out.clone().requires_grad_(True)
    OptimalSigma()(x, mine).nll.sum().backward()
    ref = out.clone().requires_grad_(True)
    mean = torch.sigmoid(ref)
    log_sigma = softclip_log_sigma(((x - mean) ** 2).mean().sqrt().log())  # as in the reference code
    (0.5 * ((x - mean) / log_sigma.exp()) ** 2 + log_sigma + 0.5 * LOG_2PI).sum().backward()
    assert torch.allclose(mine.grad, ref.grad, rtol=1e-5, atol=1e-7)
    # below the floor the gradient through σ dominates: a detached σ would be far off
    tiny = out.clone().requires_grad_(True)
    near = torch.sigmoid(out).detach() + 1e-4 * torch.randn_like(x)
    OptimalSigma()(near, tiny).nll.sum().backward()
    detached = tiny.detach().clone().requires_grad_(True)
    mean_d = torch.sigmoid(detached)
    ls = softclip_log_sigma(((near - mean_d) ** 2).mean().sqrt().log()).detach()
    (0.5 * ((near - mean_d) / ls.exp()) ** 2 + ls).sum().backward()
    assert (tiny.grad - detached.grad).abs().max() > 0.5 * detached.grad.abs().max()


def test_learned_sigma_uses_its_parameter(batch):
    x, out = batch
    lik = LearnedSigma()
    with torch.no_grad():
        lik.log_sigma.fill_(math.log(0.5))
    d = x[0].numel()
    sse = (x - torch.sigmoid(out)).pow(2).flatten(1).sum(1)
    # softclip changes log 0.5 by softplus(log 0.5 + 6) - (log 0.5 + 6) ~ 1.3e-3: take it from the formula
    ls = -6 + math.log1p(math.exp(math.log(0.5) + 6))
    expected = 0.5 * sse * math.exp(-2 * ls) + d * ls + 0.5 * d * LOG_2PI
    assert torch.allclose(lik(x, out).nll, expected)
    lik(x, out).nll.sum().backward()
    assert lik.log_sigma.grad is not None and lik.log_sigma.grad.abs() > 0


def test_per_pixel_sigma_reads_second_half(batch):
    x, out = batch
    log_sigma = torch.full_like(out, -1.0)
    terms = PerPixelSigma()(x, torch.cat([out, log_sigma], 1))
    ls = softclip_log_sigma(torch.tensor(-1.0))
    expected = (0.5 * (x - torch.sigmoid(out)).pow(2) * torch.exp(-2 * ls) + ls + 0.5 * LOG_2PI).flatten(1).sum(1)
    assert torch.allclose(terms.nll, expected)


def test_softclip_floor():
    assert abs(softclip_log_sigma(torch.tensor(-100.0)).item() + 6.0) < 1e-6
    assert abs(softclip_log_sigma(torch.tensor(3.0)).item() - 3.0) < 1e-3
    assert softclip_log_sigma(torch.tensor(-6.0)).item() == pytest.approx(-6 + math.log(2))


def test_mmd_by_hand_and_by_behaviour():
    z, p = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    e = math.exp
    by_hand = e(-0.5) + e(-2.0) - 2 * (1 + e(-2.0) + 2 * e(-0.5)) / 4  # rbf, k = exp(-d²/2) in 1-D
    assert mmd(z, p, "rbf").item() == pytest.approx(by_hand, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    for kind in ("imq", "rbf"):
        same, shifted = mmd(a, b, kind).item(), mmd(a + 1.0, b, kind).item()
        assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3)


def test_vae_objective_composition(batch):
    cfg = load_config(None, ["model.z_dim=3", "model.likelihood=gaussian", "loss.beta=4", "loss.kl_warmup_steps=10",
                             "loss.regulariser=mmd", "loss.mmd_weight=7", "model.hidden=16"])
    model = VAE(cfg.model, cfg.loss, (1, 6, 5), cfg.train.batch_size)
    x, _ = batch
    torch.manual_seed(0)
    t = model(x, step=5)
    assert model.kl_weight(5) == pytest.approx(2.0) and model.kl_weight(50) == pytest.approx(4.0)
    assert t["loss"].item() == pytest.approx((t["rec"] + 2.0 * t["kl"] + 7 * t["mmd"]).item(), rel=1e-5)
    assert t["elbo"].item() == pytest.approx(-(t["nll"] + t["kl"]).item(), rel=1e-5)


def test_loss_terms_are_fp32_under_bf16_autocast(batch):
    cfg = load_config(None, ["model.net=conv", "model.likelihood=sigma", "model.z_dim=4", "model.base_width=4",
                             "model.channel_mults=[1, 2]"])
    model = VAE(cfg.model, cfg.loss, (1, 8, 8), cfg.train.batch_size)
    x = torch.rand(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = model(x, step=0)
    assert all(v.dtype == torch.float32 for v in t.values())
    t["loss"].backward()
    assert model.likelihood.log_sigma.grad is not None


def test_a_new_likelihood_and_regulariser_are_one_class_and_one_entry_each(batch, monkeypatch):
    from models.likelihoods import LIKELIHOODS, LikelihoodTerms
    from models.regularisers import KL, REGULARISERS
    from utils.config import reference_markdown

    class Laplace(Bernoulli):  # unit-scale Laplace on the sigmoid mean: an L1 term summed over pixels
        continuous = True

        def forward(self, x, out):
            nll = ((x - self.mean(out)).abs() + math.log(2.0)).flatten(1).sum(1)
            return LikelihoodTerms(nll, nll, None)

    class L1Codes(KL):  # β·KL plus the mean absolute code
        def forward(self, kl, codes, prior, step):
            penalty, _ = super().forward(kl, codes, prior, step)
            l1 = codes.z.abs().sum(1).mean()
            return penalty + l1, {"l1": l1}

    monkeypatch.setitem(LIKELIHOODS, "laplace", Laplace)
    monkeypatch.setitem(REGULARISERS, "l1", L1Codes)
    cfg = load_config(None, ["model.likelihood=laplace", "loss.regulariser=l1", "model.z_dim=3", "model.hidden=8"])
    assert "laplace" in reference_markdown() and "l1" in reference_markdown()
    model = VAE(cfg.model, cfg.loss, (1, 6, 5), cfg.train.batch_size)
    x, _ = batch
    torch.manual_seed(0)
    t = model(x, step=0)
    torch.manual_seed(0)
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    by_hand = ((x - model.decode(z)).abs() + math.log(2.0)).flatten(1).sum(1).mean()
    assert t["nll"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert t["loss"].item() == pytest.approx((t["rec"] + t["kl"] + t["l1"]).item(), rel=1e-6)
    assert t["l1"].item() == pytest.approx(z.abs().sum(1).mean().item(), rel=1e-6)
