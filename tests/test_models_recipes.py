"""The parts strong recipes are made of, against known answers: the importance-weighted objective, the VampPrior,
learning-rate schedules (also across a resume), deeper fully connected networks, and the moving average of the
weights (also across a resume)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import DATA, FAST, REPO, run_script, train, train_cli
from models.gaussian import gaussian_log_density
from models.likelihoods import Likelihood, LikelihoodTerms, gaussian_nll
from models.priors import VampPrior, logsumexp_floored
from models.vae import VAE
from utils.config import load_config
from utils.evaluation.bounds import kl_estimate
from utils.training.schedules import build_schedule


class _Linear(Likelihood):
    """p(x|z) = N(out, 0.5²): the decoder output is the mean."""

    continuous = False
    mean = staticmethod(lambda out: out)

    def forward(self, x, out):
        nll = gaussian_nll(x, out, torch.tensor(math.log(0.5)))
        return LikelihoodTerms(nll, nll, None)


def linear_gaussian_vae(objective: str, k: int) -> tuple[VAE, torch.Tensor, float]:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, 0.25 I), so p(x) = N(b, WWᵀ + 0.25 I) exactly; the encoder is the exact
    posterior made worse on purpose (means shrunk, variances inflated). Returns (vae, x (64, 1, 1, 3), log p(x))."""
    torch.manual_seed(0)
    d, zd, s2 = 3, 2, 0.25
    w, b = torch.randn(d, zd), torch.randn(d)
    cfg = load_config(None, ["model.z_dim=2", "model.hidden=4", f"loss.objective={objective}", f"loss.k={k}"])
    vae = VAE(cfg.model, cfg.loss, (1, 1, d), cfg.train.batch_size)
    vae.likelihood = _Linear()
    dec = nn.Linear(zd, d)
    dec.weight.data, dec.bias.data = w, b
    vae.decoder = nn.Sequential(dec, nn.Unflatten(1, (1, 1, d)))
    cov = torch.linalg.inv(torch.eye(zd) + w.T @ w / s2)
    gain = cov @ w.T / s2

    class Encoder(nn.Module):
        def forward(self, x):
            return 0.8 * (x.flatten(1) - b) @ gain.T, torch.log(torch.diagonal(cov)).expand(len(x), zd) + 0.5

    vae.encoder = Encoder()
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + s2 * torch.eye(d))
    x = marginal.sample((64,))
    return vae, x.view(64, 1, 1, d), marginal.log_prob(x).mean().item()


def test_iwae_at_k_1_is_the_elbo_with_a_one_sample_kl():
    vae, x, _ = linear_gaussian_vae("iwae", 1)
    torch.manual_seed(3)
    terms = vae(x)
    torch.manual_seed(3)
    mu, logvar = vae.encode(x)
    z = mu + torch.randn(1, *mu.shape) * torch.exp(0.5 * logvar)
    log_px_z = -gaussian_nll(x, vae.decoder(z[0]), torch.tensor(math.log(0.5)))
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z[0]).sum(1)
    log_qz = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z[0]).sum(1)
    assert terms["iwae"].item() == pytest.approx((log_px_z + log_pz - log_qz).mean().item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(-terms["iwae"].item())


def test_iwae_objective_lies_between_the_elbo_and_the_log_likelihood():
    """Averaged over 64 points and 200 draws: ELBO < IWAE_5 < IWAE_50 < log p(x), with the ELBO's gap known."""
    values, errors = {}, {}
    for k in (1, 5, 50):
        vae, x, log_px = linear_gaussian_vae("iwae", k)
        torch.manual_seed(1)
        draws = torch.tensor([vae(x)["iwae"].item() for _ in range(200)])
        values[k], errors[k] = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    elbo_vae, x, _ = linear_gaussian_vae("elbo", 1)
    torch.manual_seed(1)
    elbo = sum(elbo_vae(x)["elbo"].item() for _ in range(200)) / 200  # analytic KL: nearly noise-free
    assert log_px - elbo > 0.05  # the encoder really is imperfect
    assert abs(values[1] - elbo) < 4 * errors[1] + 1e-3  # the same bound, up to MC noise
    assert elbo < values[5] < values[50] < log_px
    assert log_px - values[50] < 0.3 * (log_px - elbo)  # most of the gap closed


def test_vamp_prior_density_is_the_mixture_of_pseudo_input_posteriors():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    prior = VampPrior(3, 7, (1, 3, 4))
    prior.bind(lambda u: encoder(u).chunk(2, dim=1))
    assert not any(name.startswith("_encoder") for name, _ in prior.named_parameters())
    mu, logvar = encoder(torch.nn.functional.hardtanh(prior.pseudo, 0, 1)).chunk(2, dim=1)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(7)),
        torch.distributions.Independent(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), 1))
    z = torch.randn(5, 11, 3)
    assert torch.allclose(prior.log_prob(z), reference.log_prob(z), atol=1e-5)
    # narrow components far from 0 (σ ≈ 0.05, as a trained model's): float32 sums of the expanded square would
    # cancel to 0.01-nat errors; against a float64 mixture
    narrow = VampPrior(40, 500, (1, 3, 4))
    wide = nn.Linear(12, 80)
    narrow.bind(lambda u: (lambda mu, lv: (3 * mu, lv - 6))(*wide(u.flatten(1)).chunk(2, dim=1)))
    mu, logvar = narrow.components()
    ref64 = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(500, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(mu.double(), torch.exp(0.5 * logvar.double())), 1))
    z = mu[:20] + 0.1 * torch.randn(20, 40)
    assert torch.allclose(narrow.log_prob(z).double(), ref64.log_prob(z.double()), rtol=0, atol=1e-4)
    # samples: the same generator gives the same draws, and they follow the mixture (mean and variance)
    draws = prior.sample(20000, torch.Generator().manual_seed(1))
    assert torch.equal(draws, prior.sample(20000, torch.Generator().manual_seed(1)))
    assert torch.allclose(draws.mean(0), reference.mean, atol=0.05)
    assert torch.allclose(draws.var(0), reference.variance, rtol=0.1)


class _Narrow(nn.Module):
    """An encoder whose posteriors are narrow (σ ≈ 0.05) and far from 0, as a trained model's are."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(12, 80)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(u.flatten(1)).chunk(2, dim=1)
        return 3 * mu, logvar - 6


def test_vamp_prior_fast_path_about_the_posterior_and_its_kept_table():
    torch.manual_seed(0)
    prior, encoder = VampPrior(40, 500, (1, 3, 4)), _Narrow()
    prior.bind(encoder)
    with torch.no_grad():
        mu, logvar = prior.components()
        ref64 = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=torch.zeros(500, dtype=torch.float64)),
            torch.distributions.Independent(torch.distributions.Normal(mu.double(), torch.exp(0.5 * logvar.double())),
                                            1))
        # 16 images whose posteriors sit near some components (and one far from all), 30 codes each
        centre = torch.cat([mu[:15] + 0.2 * torch.randn(15, 40), torch.full((1, 40), 9.0)])
        z = centre + 0.1 * torch.randn(30, 16, 40)
        density = prior.about(centre)
        fast = density(z)
        assert fast.shape == (30, 16) and fast.dtype == torch.float32
        # to 1e-4 nats, or float32's own resolution where the density is astronomically small (the far image)
        assert torch.allclose(fast.double(), ref64.log_prob(z.double()), rtol=1e-6, atol=1e-4)
        assert torch.allclose(fast, prior.log_prob(z), rtol=1e-6, atol=1e-4)
        # a bound's chunks of codes share what about() prepared: chunk by chunk, the values of all at once
        assert torch.equal(torch.cat([density(z[:7]), density(z[7:])]), fast)
        # other centres, or the same after the weights change, are prepared anew
        other = centre.flip(0)
        assert torch.allclose(prior.about(other)(z.flip(1)), prior.log_prob(z.flip(1)), rtol=1e-6, atol=1e-4)
        prior.pseudo.mul_(0.5)  # as an optimiser step does, in place
        assert torch.allclose(prior.about(other)(z.flip(1)), prior.log_prob(z.flip(1)), rtol=1e-6, atol=1e-4)
        prior.pseudo.mul_(2.0)
        # the component table is kept without gradients, and made anew when the weights or the mode change
        assert prior.components()[0] is prior.components()[0]
        before = prior.components()[0]
        encoder.net.bias.add_(0.5)  # as an optimiser step does, in place
        assert not torch.equal(prior.components()[0], before)
        assert torch.equal(prior.components()[0], encoder(torch.nn.functional.hardtanh(prior.pseudo, 0, 1))[0])
        encoder.load_state_dict({k: torch.zeros_like(v) for k, v in encoder.state_dict().items()})
        assert torch.all(prior.components()[0] == 0)
        kept = prior.components()[0]
        encoder.train(not encoder.training)
        assert prior.components()[0] is not kept
    with torch.enable_grad():  # training: every call is computed anew, with its graph
        assert prior.components()[0].requires_grad


def test_floored_logsumexp_is_torch_logsumexp_for_far_codes():
    """The VampPrior's log-sum-exp floors terms e^-80 below the largest (their exp would be subnormal): the value
    and the gradient are torch.logsumexp's, also where most terms are floored."""
    x = (torch.randn(50, 500) * 60 - 1000).requires_grad_(True)
    assert (x - x.amax(-1, keepdim=True) < -80).float().mean() > 0.5  # the floor is reached by most terms
    ours, ref = logsumexp_floored(x), torch.logsumexp(x, -1)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-4)  # float32 at -1000: a step is 6e-5
    (g_ours,), (g_ref,) = torch.autograd.grad(ours.sum(), x), torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(g_ours, g_ref, atol=1e-4)  # softmax weights, summing to 1 per row


def test_vamp_prior_in_a_vae_is_trained_and_estimates_the_kl():
    cfg = load_config(None, ["model.prior=vamp", "model.vamp_components=4", "model.z_dim=3", "model.hidden=8"])
    vae = VAE(cfg.model, cfg.loss, (1, 4, 4), cfg.train.batch_size)
    assert vae.prior.pseudo.shape == (4, 1, 4, 4) and "prior.pseudo" in vae.state_dict()
    assert not any(k.startswith("prior._encoder") or k.startswith("prior.encoder") for k in vae.state_dict())
    x = torch.rand(6, 1, 4, 4)
    torch.manual_seed(2)
    terms = vae(x, step=0)
    torch.manual_seed(2)
    mu, logvar = vae.encode(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    mc = (gaussian_log_density(z, mu, logvar) - vae.prior.log_prob(z)).mean()
    assert terms["kl"].item() == pytest.approx(mc.item(), rel=1e-5)
    terms["loss"].backward()
    assert vae.prior.pseudo.grad is not None and vae.prior.pseudo.grad.abs().sum() > 0
    # evaluate.py says which KL it reports
    assert kl_estimate(vae) == "Monte Carlo, one sample per image"
    small = load_config(None, ["model.z_dim=3", "model.hidden=8"])
    assert kl_estimate(VAE(small.model, small.loss, (1, 4, 4))) == "closed form"


def lr_by_hand(schedule: str, step: int) -> float:
    """train.lr = 0.01, 4 warm-up steps, 20 steps, decay 0.5 every 5 steps, cosine floor 0.1."""
    warm = min(1.0, (step + 1) / 4)
    after = max(0, step - 4)
    decay = {"constant": 1.0, "step": 0.5 ** (after // 5), "exponential": 0.5 ** (after / 5),
             "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, after / 16)))}[schedule]
    return 0.01 * warm * decay


SCHEDULE_KEYS = ["train.lr=0.01", "train.warmup_steps=4", "train.steps=20", "train.lr_decay=0.5",
                 "train.lr_decay_steps=5", "train.lr_min_ratio=0.1"]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "exponential", "step"])
def test_schedules_against_learning_rates_by_hand(schedule):
    s = build_schedule(load_config(None, [f"train.lr_schedule={schedule}", *SCHEDULE_KEYS]).train)
    for step in range(25):
        assert 0.01 * s.factor(step) == pytest.approx(lr_by_hand(schedule, step), rel=1e-12), step
    assert lr_by_hand("cosine", 19) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16))))


@pytest.mark.slow  # trains in a new process, then resumes and extends the run
def test_schedule_is_followed_across_a_resume(tmp_path, real_data):
    run = tmp_path / "run"
    common = [*FAST, "train.lr_schedule=cosine", *SCHEDULE_KEYS, "model.hidden=32", f"data.root={DATA}"]
    first = run_script([str(REPO / "train_vae.py"), "-c", str(REPO / "configs/mnist.yaml"), "-e", str(run), *common,
                        "train.save_every=10", "train.steps=10"])
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_script([str(REPO / "train_vae.py"), "-r", "latest", "-e", str(run), "train.steps=20"])
    assert resumed.returncode == 0 and "at step 10" in resumed.stdout, resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r["split"] == "train"}
    assert sorted(lrs) == list(range(1, 21))
    # steps 1-10 ran with train.steps=10, so the cosine spanned 10 steps then; 11-20 follow the 20-step schedule
    for step in range(11, 21):
        assert lrs[step] == pytest.approx(lr_by_hand("cosine", step - 1), rel=1e-9), step


def test_deeper_mlp_and_its_activation():
    cfg = load_config(None, ["model.hidden=[200, 100]", "model.activation=tanh", "model.z_dim=5"])
    vae = VAE(cfg.model, cfg.loss, (1, 28, 28), cfg.train.batch_size)
    linears = [m for m in vae.encoder.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 200), (200, 100), (100, 10)]
    assert sum(isinstance(m, nn.Tanh) for m in vae.encoder.net) == 2
    dec = [m for m in vae.decoder.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dec] == [(5, 100), (100, 200), (200, 784)]
    assert load_config(None, ["model.hidden=400"]).model.hidden == [400]  # one layer, as configs wrote it
    default = load_config(None, [])
    classic = VAE(default.model, default.loss, (1, 28, 28))  # the weights' names of the classic MLP are unchanged
    assert {k for k in classic.state_dict() if k.startswith("encoder")} == {
        "encoder.net.1.weight", "encoder.net.1.bias", "encoder.net.3.weight", "encoder.net.3.bias"}


def test_moving_average_of_the_weights_by_hand_and_across_a_resume(tmp_path, real_data):
    """With decay 0.5 the saved weights after 3 steps are θ1/4 + θ2/4 + θ3/2 of the raw weights θt (which each
    step's checkpoint holds); a run stopped at step 2 and resumed ends bit-identical to the unbroken one."""
    common = ["train.ema_decay=0.5", "model.hidden=32", "train.keep_checkpoints=0", "train.save_every=1",
              "train.eval_every=3", "train.sample_every=3"]
    train(tmp_path / "full", extra=[*common, "train.steps=3"])
    raw = [load_file(tmp_path / "full" / "checkpoints" / f"step_{t:07d}" / "model.safetensors") for t in (1, 2, 3)]
    saved = load_file(tmp_path / "full" / "model.safetensors")
    assert saved.keys() == raw[0].keys()
    for k in saved:
        torch.testing.assert_close(saved[k], raw[0][k] / 4 + raw[1][k] / 4 + raw[2][k] / 2)
    assert not torch.equal(saved["decoder.net.0.weight"], raw[2]["decoder.net.0.weight"])
    ema = load_file(tmp_path / "full" / "checkpoints" / "step_0000003" / "ema.safetensors")
    assert all(torch.equal(ema[f"module.{k}"], saved[k]) for k in saved) and int(ema["n_averaged"]) == 3

    train(tmp_path / "part", extra=[*common, "train.steps=2"])
    res = train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=3"])
    assert res.returncode == 0 and "at step 2" in res.stdout, res.stderr[-2000:]
    resumed = load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(resumed[k], saved[k]) for k in saved)


def test_moving_average_cannot_appear_on_resume(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = train_cli(["-r", "latest", "-e", str(run), "train.steps=4", "train.ema_decay=0.9"])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {run / 'checkpoints' / 'step_0000002'} has no ema.safetensors: the run kept no moving "
        f"average of the weights; resume with train.ema_decay=0, as it was started")
