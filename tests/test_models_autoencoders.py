"""The autoencoder family and the ex-post samplers: the AAE's discriminator against a hand computation and its exact
resume, AE and AAE trained from their configs, the GMM sampler against scikit-learn, the two-stage sampler closer to
the training codes than N(0, I), every sampler reproducible from its seed, and the one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import evaluate
import sample
from conftest import REPO, cli, train, train_cli
from models.regularisers import PosteriorSample, discriminator_losses
from models.sampler_rules import fitted_names
from models.samplers import GaussianMixtureSampler, SamplerOptions, TwoStageSampler
from models.vae import VAE
from utils.config import load_config
from utils.errors import UserError
from utils.evaluation.samplers import fitted_sampler, kde_log_density, sampler_scores
from utils.inference import TrainedVAE
from utils.training.run_folder import read_metrics

AE, AAE = "configs/mnist_ae.yaml", "configs/mnist_aae.yaml"
SMALL = ["model.hidden=64", "model.z_dim=2", "train.batch_size=64"]


def test_discriminator_losses_by_hand():
    on_prior, on_codes = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.5])
    sig = torch.sigmoid
    d_hand = 0.5 * (-torch.log(sig(on_prior)).mean() - torch.log(1 - sig(on_codes)).mean())
    g_hand = -torch.log(sig(on_codes)).mean()
    d, g = discriminator_losses(on_prior, on_codes)
    assert d.item() == pytest.approx(d_hand.item(), rel=1e-6) and g.item() == pytest.approx(g_hand.item(), rel=1e-6)


def test_the_aae_trains_its_discriminator_on_prior_draws_against_codes():
    """The discriminator's loss after a step is the hand computation on the step's codes and the prior draws the
    global generator gives next; the encoder's term is BCE(D(codes), 1), weighted by loss.aae_weight."""
    cfg = load_config(None, ["loss.objective=ae", "loss.regulariser=aae", "loss.aae_hidden=[8]", "model.z_dim=3",
                             "loss.aae_weight=7"])
    vae = VAE(cfg.model, cfg.loss, (1, 4, 4))
    reg = vae.regulariser
    z = torch.randn(16, 3)
    penalty, terms = reg(torch.zeros(16), PosteriorSample(z, z, z), vae.prior, 0)
    by_hand = F.binary_cross_entropy_with_logits(reg.critic(z)[:, 0], torch.ones(16))
    assert terms["adversarial"].item() == pytest.approx(by_hand.item()) and penalty.item() == pytest.approx(
        7 * by_hand.item())
    torch.manual_seed(5)
    drawn = torch.randn(16, 3)
    expected, _ = discriminator_losses(reg.critic(drawn)[:, 0], reg.critic(z)[:, 0])
    before = [p.detach().clone() for p in reg.critic.parameters()]
    torch.manual_seed(5)
    out = reg.after_step(type("One", (), {"num_processes": 1})(), torch.zeros(()))
    assert out["critic_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, reg.critic.parameters()))  # a step was taken
    assert {id(p) for p in reg.critic.parameters()}.isdisjoint({id(p) for p in vae.trained_parameters()})


def test_aae_resumes_exactly_and_ae_trains_from_its_config(tmp_path, real_data):
    common = [*SMALL, "loss.aae_hidden=[32]", "train.save_every=3", "train.eval_every=6"]
    train(tmp_path / "full", AAE, [*common, "train.steps=6"])
    train(tmp_path / "part", AAE, [*common, "train.steps=3"])
    assert (tmp_path / "part" / "checkpoints" / "step_0000003" / "regulariser.safetensors").is_file()
    assert train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=6"]).returncode == 0
    full, part = read_metrics(tmp_path / "full", "train"), read_metrics(tmp_path / "part", "train")
    assert [(r["loss"], r["critic_loss"], r["adversarial"]) for r in full] == [
        (r["loss"], r["critic_loss"], r["adversarial"]) for r in part]
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert any(k.startswith("regulariser.critic.") for k in wa) and all(torch.equal(wa[k], wb[k]) for k in wa)
    test = read_metrics(tmp_path / "full", "test")[-1]
    assert "elbo" not in test and "kl" not in test and math.isfinite(test["nll"])  # no bound for an autoencoder

    train(tmp_path / "ae", AE, [*SMALL, "train.steps=200", "train.log_every=50"])
    rows = read_metrics(tmp_path / "ae", "train")
    assert rows[-1]["rec"] < rows[0]["rec"] and "kl" not in rows[0]
    assert not list((tmp_path / "ae" / "samples").glob("*_samples.png"))  # no prior to draw grids from


@pytest.mark.slow  # two 600-step trainings of the shipped networks (about 40 s)
def test_the_shipped_aae_reconstructs_about_as_well_as_the_ae(tmp_path, real_data):
    # At aae_weight 100 the encoder chased the discriminator: by step 600 the reconstruction was 202 nats
    # against the AE's 90 (97 at weight 1), and the discriminator told codes from prior draws every time.
    steps = ["train.steps=600", "train.batch_size=128", "train.log_every=100"]
    train(tmp_path / "aae", AAE, steps)
    train(tmp_path / "ae", AE, steps)
    aae, ae = read_metrics(tmp_path / "aae", "train")[-1], read_metrics(tmp_path / "ae", "train")[-1]
    assert aae["rec"] < 1.15 * ae["rec"], (aae["rec"], ae["rec"])
    assert aae["critic_accuracy"] < 0.98 and aae["adversarial"] < 4.0  # the encoder's codes still fool it at times


def test_autoencoder_refusals(tmp_path):
    with pytest.raises(UserError, match="has no posterior variance and no KL, which loss.regulariser=kl needs"):
        load_config(None, ["loss.objective=ae"])
    with pytest.raises(UserError, match="weigh the KL, which loss.objective=ae does not have"):
        load_config(str(REPO / AE), ["loss.beta=4"])


def test_an_autoencoder_that_could_not_be_used_is_refused_before_training(tmp_path):
    """A conditional AE draws only through its prior, which nothing pulls its codes to (and the ex-post samplers
    refuse a conditional model); an AE has no KL, the only term that trains a VampPrior's pseudo-inputs, unless
    its regulariser draws from the prior with gradients (the WAE's MMD)."""
    res = train_cli(["-c", str(REPO / AE), "-e", str(tmp_path / "run"), "model.conditional=true"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and not (tmp_path / "run").exists(), res.stderr
    assert "model.conditional=true and loss.objective=ae with loss.regulariser=none do not go together" in lines[0]
    assert "use loss.regulariser=mmd or aae, model.conditional=false, or loss.objective=elbo" in lines[0]
    for regulariser in ("none", "aae"):
        with pytest.raises(UserError, match="model.prior=vamp learns through the KL, which loss.objective=ae with "
                                            f"loss.regulariser={regulariser} does not have.*use model.prior=normal"):
            load_config(str(REPO / AE), [f"loss.regulariser={regulariser}", "model.prior=vamp"])
    # what can be used is accepted: a conditional AAE or WAE draws each class from its prior; a WAE's MMD trains
    # the pseudo-inputs through its reparameterised prior draws
    assert load_config(str(REPO / AAE), ["model.conditional=true"]).model.conditional
    wae = load_config(str(REPO / AE), ["loss.regulariser=mmd", "loss.mmd_weight=10", "model.prior=vamp",
                                       "model.vamp_components=4", "model.hidden=[16]"])
    vae = VAE(wae.model, wae.loss, (1, 8, 8))
    vae(torch.rand(4, 1, 8, 8), 0)["loss"].backward()
    assert vae.prior.pseudo.grad is not None and vae.prior.pseudo.grad.abs().sum() > 0


def test_the_aae_discriminator_leaves_no_gradient_on_a_learned_prior():
    """Its step draws from the prior: a VampPrior's draws go through the encoder and the pseudo-inputs, whose
    gradients the next VAE step would otherwise add to its own."""
    cfg = load_config(None, ["loss.regulariser=aae", "model.prior=vamp", "model.vamp_components=4",
                             "model.hidden=[16]", "loss.aae_hidden=[8]"])
    vae = VAE(cfg.model, cfg.loss, (1, 8, 8))
    vae(torch.rand(4, 1, 8, 8), 0)  # the forward keeps the step's codes; no backward
    vae.regulariser.after_step(type("One", (), {"num_processes": 1})(), torch.zeros(()))
    assert all(p.grad is None for p in vae.trained_parameters())
    assert any(p.grad is not None for p in vae.regulariser.critic.parameters())


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, real_data):
    run = tmp_path_factory.mktemp("ae") / "run"
    train(run, AE, [*SMALL, "train.steps=400", "train.log_every=100"])
    return run


def test_gmm_sampler_is_scikit_learns_fit(ae_run):
    from sklearn.mixture import GaussianMixture

    vae = TrainedVAE.load(ae_run)
    codes = torch.randn(300, 2, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 3.0])
    for cov in ("full", "diag"):
        ours = GaussianMixtureSampler().fit(codes, SamplerOptions(gmm_components=3, gmm_covariance=cov, seed=4))
        ref = GaussianMixture(3, covariance_type=cov, random_state=4, max_iter=200).fit(codes.double().numpy())
        assert np.allclose(ours.weights.numpy(), ref.weights_) and np.allclose(ours.means.numpy(), ref.means_)
        full = ref.covariances_ if cov == "full" else np.stack([np.diag(v) for v in ref.covariances_])
        assert np.allclose((ours.cholesky @ ours.cholesky.transpose(1, 2)).numpy(), full)
        assert np.allclose(ours.log_prob(codes[:50]).double().numpy(), ref.score_samples(codes[:50].double().numpy()),
                           atol=1e-4)
    assert vae.deterministic and not vae.has_prior


def test_samplers_are_reproducible_kept_and_refused_in_one_line(ae_run, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(ae_run, run)
    res = cli(sample.main, ["--exp_dir", str(run), "--mode", "sample"])
    assert res.returncode == 2 and "has no prior to draw from" in res.stderr
    first = cli(sample.main, ["--exp_dir", str(run), "--sampler", "gmm", "--n_samples", "9", "--seed", "3"])
    assert first.returncode == 0, first.stderr
    png = (run / "sample" / "samples_gmm.png").read_bytes()
    kept = run / "samplers" / "gmm.safetensors"
    stamp = kept.stat().st_mtime_ns
    assert cli(sample.main, ["--exp_dir", str(run), "--sampler", "gmm", "--n_samples", "9", "--seed", "3"]
               ).returncode == 0
    assert kept.stat().st_mtime_ns == stamp and (run / "sample" / "samples_gmm.png").read_bytes() == png
    res = cli(sample.main, ["--exp_dir", str(run), "--sampler", "gmm", "--gmm_components", "4"])
    assert res.returncode == 2 and "pass --refit" in res.stderr
    vae = TrainedVAE.load(run)
    a = vae.sample(5, generator=torch.Generator().manual_seed(0), sampler="gmm")
    b = vae.sample(5, generator=torch.Generator().manual_seed(0), sampler="gmm")
    assert torch.equal(a, b) and a.shape == (5, 1, 28, 28)
    two = TwoStageSampler().fit(torch.randn(200, 2), SamplerOptions(two_stage_steps=20, two_stage_hidden=[16]))
    assert torch.equal(two.sample(4, torch.Generator().manual_seed(1)), two.sample(4, torch.Generator().manual_seed(1)))
    conditional = load_config(None, ["model.conditional=true", "model.n_classes=10"])
    cvae = VAE(conditional.model, conditional.loss, (1, 28, 28))
    with pytest.raises(UserError, match="this model is conditional"):
        fitted_sampler(cvae, tmp_path, "gmm", lambda: pytest.fail("no data is read"), SamplerOptions())


@pytest.mark.slow  # trains the second stage, the flow and the velocity field
def test_every_fitted_sampler_fits_the_codes_better_than_the_prior(ae_run):
    """On a trained autoencoder's codes, by both offline numbers: N(0, I) does not know where its codes are."""
    res = cli(evaluate.main, ["--exp_dir", str(ae_run), "--metrics", "recon,samplers", "--two_stage_steps", "600",
                              "--flow_steps", "300", "--flow_matching_steps", "600", "--n_test", "2000",
                              "--out", str(ae_run.parent / "eval.json")])
    assert res.returncode == 0, res.stderr
    import json

    s = json.loads((ae_run.parent / "eval.json").read_text())["samplers"]
    assert list(s) == fitted_names()  # an AE has no prior
    vae = TrainedVAE.load(ae_run)
    from utils.data.registry import load_data
    from utils.evaluation.latents import posterior_stats
    from utils.evaluation.samplers import PriorSampler

    train_set, test_set, _ = load_data(vae.config.data)
    prior = sampler_scores(PriorSampler(vae.prior), posterior_stats(vae, train_set)[0],
                           posterior_stats(vae, test_set, limit=2000)[0])
    for name in fitted_names():
        assert s[name]["held_out"] > prior["held_out"] and s[name]["reverse"] > prior["reverse"], (name, s, prior)


def test_kde_log_density_is_scipys_gaussian_kde():
    """Scott's rule as scipy applies it (the codes' full covariance times N^(-2/(d+4))), in float64; a direction
    without spread gets the documented floor, and codes that are all one point are refused in one line."""
    from scipy.stats import gaussian_kde

    g = torch.Generator().manual_seed(0)
    codes = torch.randn(60, 3, generator=g, dtype=torch.float64) @ torch.tensor([[2.0, 0, 0], [0.5, 1, 0], [0, 0, 0.1]],
                                                                                  dtype=torch.float64)
    points = torch.randn(9, 3, generator=g, dtype=torch.float64)
    ref = gaussian_kde(codes.numpy().T).logpdf(points.numpy().T)
    assert np.allclose(kde_log_density(points, codes).double().numpy(), ref, atol=1e-5, rtol=1e-6)  # float32 out
    flat = torch.cat([codes[:, :2], torch.full((60, 1), 0.25, dtype=torch.float64)], 1)  # no spread along z2
    assert torch.isfinite(kde_log_density(points, flat)).all()
    with pytest.raises(UserError, match="all one point") as e:
        kde_log_density(points, torch.ones(20, 3))
    assert "\n" not in str(e.value)


def test_the_aae_updates_in_one_pass_not_the_papers_three_phases(tmp_path, real_data, monkeypatch):
    """The order of a training step, from the real loop: one forward gives the reconstruction and the encoder's
    adversarial term (against the discriminator as it stood), one step of the VAE's optimizer takes both, then the
    discriminator steps on that forward's codes: from the encoder before its update, as pythae's simultaneous
    updates. Makhzani et al.'s three phases would train the discriminator on the codes of the updated encoder."""
    from models.adversarial import Adversarial

    seen: list[dict] = []
    forward, critic_loss, encode = Adversarial.forward, Adversarial.critic_loss, VAE.encode

    def weights(module: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in module.parameters()]

    def recording_encode(self, x, y=None):
        if self.training:
            seen.append({"vae": self, "x": x.detach().clone()})
        return encode(self, x, y)

    def recording_forward(self, kl, codes, prior, step):
        if self.training:
            seen[-1] |= {"codes": codes.z.detach().clone(), "critic": weights(self.critic),
                         "encoder": weights(seen[-1]["vae"].encoder)}
        return forward(self, kl, codes, prior, step)

    def recording_critic_loss(self, z):
        vae = seen[-1]["vae"]
        with torch.no_grad():
            after = encode(vae, seen[-1]["x"])[0].float()
        seen[-1] |= {"trained_on": z.clone(), "after_update": after, "critic_then": weights(self.critic),
                     "encoder_then": weights(vae.encoder)}
        return critic_loss(self, z)

    monkeypatch.setattr(VAE, "encode", recording_encode)
    monkeypatch.setattr(Adversarial, "forward", recording_forward)
    monkeypatch.setattr(Adversarial, "critic_loss", recording_critic_loss)
    train(tmp_path / "run", AAE, [*SMALL, "loss.aae_hidden=[32]", "train.steps=2"])
    assert len(seen) == 2 and all("trained_on" in s for s in seen)
    for s in seen:
        # the VAE's step (reconstruction and adversarial term together) came first: its encoder had moved ...
        assert any(not torch.equal(a, b) for a, b in zip(s["encoder"], s["encoder_then"]))
        # ... but the discriminator trained on the codes of the encoder before that step, not after it
        assert torch.equal(s["trained_on"], s["codes"]) and (s["after_update"] - s["codes"]).abs().max() > 1e-6
        # and the encoder's adversarial term was against the discriminator its own step then trained
        assert all(torch.equal(a, b) for a, b in zip(s["critic"], s["critic_then"]))
    assert any(not torch.equal(a, b) for a, b in zip(seen[0]["critic"], seen[1]["critic"]))  # which did step
