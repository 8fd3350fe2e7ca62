"""The hierarchical VAE (models/ladder.py) against references: one layer is the plain VAE on identical weights and
draws; each layer's KL is its closed form (torch.distributions) and a float64 Monte Carlo estimate; the IWAE bound
through every layer is log p(x|z_1) + log p(z_1|z_2) + log p(z_2) − log q(z_1|z_2, x) − log q(z_2|x) by hand; the
training aids by hand; resume bit for bit; bad input in one line with nothing written."""

from __future__ import annotations

import json
import math
from decimal import Decimal, getcontext

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

import evaluate
import sample
from conftest import CPU, FAST, REPO, accel_2, cli, run_script, train, train_cli
from models.ladder import merged_terms
from models.objectives import trained_kl
from models.samplers import SamplerOptions
from models.vae import VAE
from utils.config import load_config
from utils.errors import UserError
from utils.evaluation.bounds import image_bounds
from utils.inference import TrainedVAE
from utils.inference import export as exporter
from utils.training.optim import StepGuard
from utils.training.run_folder import read_metrics

HVAE = "configs/binarized_mnist_hvae.yaml"
SMALL = ["model.latent_dims=[12,6]", "model.z_dim=6", "model.hidden=[48,24]"]
LADDER = ["model.net=ladder", *SMALL]


def _vae(overrides: list[str], seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    cfg = load_config(None, overrides)
    return VAE(cfg.model, cfg.loss, (1, 28, 28), 8).eval()


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)).bernoulli()


def _copy_linears(src: nn.Module, dst: nn.Module) -> None:
    a = [m for m in src.modules() if isinstance(m, nn.Linear)]
    b = [m for m in dst.modules() if isinstance(m, nn.Linear)]
    assert [m.weight.shape for m in a] == [m.weight.shape for m in b]
    for m, n in zip(a, b):
        n.load_state_dict(m.state_dict())


@pytest.mark.parametrize("objective", [["loss.objective=elbo"], ["loss.objective=iwae", "loss.k=5"]])
def test_one_layer_ladder_is_the_plain_vae(objective):
    common = ["model.z_dim=8", "model.activation=tanh", *objective]
    plain = _vae(["model.net=mlp", "model.hidden=[32,32]", *common])
    ladder = _vae(["model.net=ladder", "model.hidden=[32]", "model.latent_dims=[8]", *common], seed=3)
    _copy_linears(plain.encoder, ladder.encoder)
    _copy_linears(plain.decoder, ladder.decoder)
    x = _images()
    torch.manual_seed(7)
    a = plain(x)
    torch.manual_seed(7)
    b = ladder(x)
    assert b["kl_1"] == b["kl"] and "kl_1" not in a
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-5), key
    torch.manual_seed(11)
    bound_a = image_bounds(plain, x, 20, chunk=7)
    torch.manual_seed(11)
    bound_b = image_bounds(ladder, x, 20, chunk=7)
    for u, v in zip(bound_a, bound_b):
        assert torch.allclose(u, v, rtol=1e-6, atol=1e-5)


def _merged(bottom_up, top_down):
    """Sønderby et al. 2016, eqs. 17-18, as written: precisions add, means weigh by precision."""
    (mu_b, lv_b), (mu_p, lv_p) = bottom_up, top_down
    prec = 1 / lv_b.exp() + 1 / lv_p.exp()
    return (mu_b / lv_b.exp() + mu_p / lv_p.exp()) / prec, 1 / prec


def test_each_layer_kl_is_its_closed_form_and_a_float64_monte_carlo_estimate():
    vae, x = _vae(LADDER), _images()
    with torch.no_grad():
        vae.encoder.heads[-1].bias.add_(0.5)  # the top posterior off the prior: a KL well above 0
    (mu_hat, lv_hat), (mu2, lv2) = vae.encoder.layers(x)
    torch.manual_seed(5)
    terms = vae(x)
    torch.manual_seed(5)
    z2 = mu2 + torch.randn_like(mu2) * (0.5 * lv2).exp()  # the objective's first draw
    p = vae.decoder.prior_params(0, z2)
    mean, var = _merged((mu_hat, lv_hat), p)
    q1, p1 = Normal(mean, var.sqrt()), Normal(p[0], (0.5 * p[1]).exp())
    kl_1 = kl_divergence(q1, p1).sum(1)
    kl_2 = kl_divergence(Normal(mu2, (0.5 * lv2).exp()), Normal(0.0, 1.0)).sum(1)
    assert terms["kl_1"].item() == pytest.approx(kl_1.mean().item(), rel=1e-5)
    assert terms["kl_2"].item() == pytest.approx(kl_2.mean().item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx((kl_1 + kl_2).mean().item(), rel=1e-5)
    assert kl_1.mean() > 0.1 and kl_2.mean() > 0.1  # neither term is trivially zero here
    # float64 Monte Carlo E_q[log q − log p] of layer 1 for image 0, within 4 standard errors
    q64 = Normal(mean[0].double(), var[0].double().sqrt())
    p64 = Normal(p[0][0].double(), (0.5 * p[1][0]).exp().double())
    z = q64.sample((200_000,))
    gap = (q64.log_prob(z) - p64.log_prob(z)).sum(1)
    assert abs(gap.mean().item() - kl_1[0].item()) < 4 * gap.std().item() / math.sqrt(len(gap))


def test_iwae_bound_goes_through_every_layer():
    vae, x, k = _vae(LADDER), _images(4), 9
    torch.manual_seed(3)
    bound, rec, kl = image_bounds(vae, x, k)
    (mu_hat, lv_hat), (mu2, lv2) = vae.encoder.layers(x)
    torch.manual_seed(3)
    z2 = mu2 + (0.5 * lv2).exp() * torch.randn(k, *mu2.shape)               # (k, B, z2)
    flat = z2.flatten(0, 1)
    p = vae.decoder.prior_params(0, flat)
    mean, var = _merged((mu_hat.repeat(k, 1), lv_hat.repeat(k, 1)), p)
    z1 = mean + var.sqrt() * torch.randn_like(mean)                           # drawn after z2, as the pass does
    log_w = (Bernoulli(logits=vae.decoder.out(z1)).log_prob(x.repeat(k, 1, 1, 1)).flatten(1).sum(1)
             + Normal(p[0], (0.5 * p[1]).exp()).log_prob(z1).sum(1)
             - Normal(mean, var.sqrt()).log_prob(z1).sum(1)).view(k, -1)
    log_w = log_w + Normal(0.0, 1.0).log_prob(z2).sum(2) - Normal(mu2, (0.5 * lv2).exp()).log_prob(z2).sum(2)
    expected = torch.logsumexp(log_w, 0) - math.log(k)
    assert torch.allclose(bound, expected, rtol=1e-5, atol=1e-3)
    assert (bound > -rec - kl - 1e-3).all()  # k = 9 samples bound log p(x) no worse than the ELBO, on average


def _exact_terms(mu_b: float, lv_b: float, mu_p: float, lv_p: float, eps: float) -> tuple[Decimal, Decimal]:
    """KL(q || p) and log p(z) − log q(z) at z = μ_q + σ_q·ε for the precision-weighted merge, in 60-digit decimals
    straight from the Gaussians' densities (no float can hold σ_p⁻² = e^120)."""
    getcontext().prec = 60
    mu_b, lv_b, mu_p, lv_p, eps = (Decimal(float(v)) for v in (mu_b, lv_b, mu_p, lv_p, eps))
    var_b, var_p = lv_b.exp(), lv_p.exp()
    var_q = 1 / (1 / var_b + 1 / var_p)
    mu_q = (mu_b / var_b + mu_p / var_p) * var_q
    z = mu_q + var_q.sqrt() * eps
    log_p = -(z - mu_p) ** 2 / (2 * var_p) - var_p.ln() / 2
    log_q = -(z - mu_q) ** 2 / (2 * var_q) - var_q.ln() / 2
    kl = ((var_p / var_q).ln() + (var_q + (mu_q - mu_p) ** 2) / var_p - 1) / 2
    return kl, log_p - log_q


def test_a_very_tight_conditional_prior_keeps_the_lower_terms_exact_and_the_bound_finite():
    # An unused lower layer of a trained ladder had log σ_p² ≈ −64 and its k = 5000 bound turned NaN in float32.
    g = torch.Generator().manual_seed(0)
    lv_p = torch.tensor([-120.0, -100.0, -90.0, -64.0, -30.0, -3.0, 0.0, 2.0])
    mu_b, lv_b, mu_p, eps = (torch.randn(len(lv_p), generator=g) for _ in range(4))
    _, _, kl, ratio = merged_terms((mu_b, lv_b), (mu_p, lv_p), eps)
    for i in range(len(lv_p)):
        kl_i, ratio_i = _exact_terms(mu_b[i], lv_b[i], mu_p[i], lv_p[i], eps[i])
        assert kl[i].item() == pytest.approx(float(kl_i), rel=1e-4, abs=1e-6)
        assert ratio[i].item() == pytest.approx(float(ratio_i), rel=1e-4, abs=1e-5)
    vae, x = _vae(LADDER), _images(4)
    with torch.no_grad():
        vae.decoder.top_down[0][-1].bias[12:] -= 100.0  # log σ_p² of every z_1 dimension near −100
    torch.manual_seed(3)
    bound, rec, kl_sum = image_bounds(vae, x, 50)
    assert torch.isfinite(bound).all() and torch.isfinite(kl_sum).all()
    assert (bound > -rec - kl_sum - 1e-3).all()


def test_the_vamp_prior_sits_on_the_top_layer():
    """Tomczak & Welling's HVAE + VampPrior: p(z_L) = (1/K) Σ_k q(z_L | u_k), the top posterior at pseudo-inputs."""
    vae, x = _vae([*LADDER, "model.prior=vamp", "model.vamp_components=5"]), _images(3)
    z = torch.randn(4, 6)
    mu, logvar = vae.encoder.layers(torch.nn.functional.hardtanh(vae.prior.pseudo, 0.0, 1.0))[-1]
    mixture = torch.logsumexp(Normal(mu, (0.5 * logvar).exp()).log_prob(z[:, None]).sum(2), 1) - math.log(5)
    assert torch.allclose(vae.prior.log_prob(z), mixture, atol=1e-4)
    terms = vae(x)
    assert torch.isfinite(terms["loss"]) and terms["kl_2"] != 0 and torch.isfinite(image_bounds(vae, x, 4)[0]).all()


def test_free_bits_and_kl_balancing_by_hand():
    cfg = load_config(None, [*LADDER, "loss.free_bits=0.5", "loss.kl_balance=true", "loss.kl_warmup_steps=10"])
    low = torch.tensor([0.1, 0.3], requires_grad=True)   # mean 0.2 < 0.5: held at 0.5 each, no gradient
    high = torch.tensor([2.0, 4.0], requires_grad=True)  # mean 3.0: as is
    cfg.loss.kl_balance = False
    out = trained_kl([low, high], cfg.loss, True, [12, 6])
    assert out.tolist() == [2.5, 4.5]
    out.sum().backward()
    assert low.grad.tolist() == [0.0, 0.0] and high.grad.tolist() == [1.0, 1.0]
    cfg.loss.kl_balance, cfg.loss.free_bits = True, 0.0
    gamma = torch.tensor([(0.2 + 0.01) / 12, (3.0 + 0.01) / 6])
    gamma = gamma / gamma.mean()  # Vahdat & Kautz's coefficients, averaging 1
    out = trained_kl([low, high], cfg.loss, True, [12, 6])
    assert torch.allclose(out, gamma[0] * low + gamma[1] * high)
    assert torch.equal(trained_kl([low, high], cfg.loss, False, [12, 6]), low + high)  # warmed up: plain sum


def test_gradient_skipping_skips_only_norms_above_the_threshold():
    guard = StepGuard(nn.Linear(1, 1), torch.device("cpu"))
    one = type("One", (), {"num_processes": 1})()
    loss = torch.tensor(1.0)
    assert guard.check(loss, torch.tensor(5.0), one, skip_above=4.0).item() == 1.0
    assert guard.check(loss, torch.tensor(3.0), one, skip_above=4.0).item() == 0.0
    assert guard.check(loss, torch.tensor(5.0), one).item() == 0.0  # off by default
    assert guard.total.item() == 1.0


def test_lower_layers_decode_from_their_own_codes():
    """What a traversal of a lower layer uses: decoding from a layer, its conditional prior from a top code, and
    each layer's posterior and prior at the posterior means, against the ladder's own passes."""
    vae = _vae(["model.net=ladder", "model.latent_dims=[12,8,6]", "model.z_dim=6", "model.hidden=[48,32,24]"])
    dec, z = vae.decoder, torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    assert vae.latent_layers == 3 and _vae(["model.z_dim=4"]).latent_layers == 1
    with torch.no_grad():
        assert torch.equal(dec.from_layer(z, 2), dec(z))  # the top layer decoded from itself is the top code
        mu_2 = dec.prior_params(1, z)[0]                   # z_2 at its prior mean given z_3
        assert torch.equal(dec.prior_means(z, 0)[0], dec.prior_params(0, mu_2)[0])
        assert torch.allclose(dec.from_layer(dec.prior_means(z, 0)[0], 0), dec(z), atol=1e-6)
        x = _images(5)
        mu, _, below = vae.encode_layers(x)
        pairs = dec.layer_posteriors(mu, below)
        _, lower = dec.posterior(mu, below, draw=False)
        for (q, p, kl_each), mean, kl in zip(pairs, lower.means, lower.kl):
            assert torch.allclose(q[0], mean) and torch.allclose(kl_divergence(Normal(q[0], (0.5 * q[1]).exp()),
                                                                               Normal(p[0], (0.5 * p[1]).exp())).sum(1),
                                                                 kl, atol=1e-5)
            assert torch.allclose(kl_each.sum(1), kl)
        assert torch.equal(pairs[1][1][0], dec.prior_params(1, mu)[0])
        assert torch.equal(pairs[0][1][0], dec.prior_params(0, pairs[1][0][0])[0])
        assert torch.allclose(vae.decode_layer(pairs[0][0][0], 0), vae.reconstruction(x), atol=1e-6)


@pytest.mark.slow  # trains end to end
def test_ladder_resumes_bit_for_bit_with_its_training_aids(tmp_path, real_data):
    extra = [*SMALL, "train.save_every=4", "train.eval_every=4", "loss.free_bits=0.2", "loss.kl_balance=true",
             "loss.kl_warmup_steps=6", "train.grad_skip=1000", "model.net=ladder_conv", "model.base_width=4",
             "model.channel_mults=[1,2]", "train.lr_schedule=constant"]  # (a cosine follows train.steps)
    train(tmp_path / "full", HVAE, [*extra, "train.steps=8"])
    train(tmp_path / "part", HVAE, [*extra, "train.steps=4"])
    res = train_cli(["-r", "latest", "-e", str(tmp_path / "part"), "train.steps=8"])
    assert res.returncode == 0, res.stderr[-2000:]
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in full] == [r["step"] for r in part]
    for a, b in zip(full, part):
        assert (a["loss"], a["kl_1"], a["kl_2"]) == (b["loss"], b["kl_1"], b["kl_2"])
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory, real_data):
    """200 steps of a small two-layer ladder on binarised MNIST; the result of ``train`` beside the run."""
    run = tmp_path_factory.mktemp("ladder") / "run"
    res = train(run, HVAE, [*SMALL, "train.steps=200", "train.log_every=50", "train.batch_size=64",
                            "loss.kl_warmup_steps=50"])
    return run, res


@pytest.mark.slow  # trains end to end
def test_a_short_ladder_run_learns_and_evaluates_per_layer(ladder_run):
    run, res = ladder_run
    assert "kl_1=" in res.stderr and "kl_2=" in res.stderr and "kl_weight=" not in res.stderr  # the bar
    rows = read_metrics(run, "train")
    assert rows[-1]["loss"] < rows[0]["loss"] - 50 and rows[-1]["kl_2"] > 0 and rows[-1]["kl_1"] > 0
    events = b"".join(p.read_bytes() for p in (run / "tb").rglob("events*"))  # TensorBoard, the default tracker
    assert b"train/kl_1" in events and b"train/kl_2" in events
    res = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "elbo,nll,au", "--k", "20", "--n_test", "200",
                              "--binarize"])
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((run / "eval.json").read_text())
    b, au = out["nll"], out["au"]
    assert b["nll"] <= -b["elbo"] + 0.5 and math.isfinite(b["nll"])  # k = 20 tightens the ELBO
    assert [layer["z_dim"] for layer in au["layers"]] == [12, 6] and au["layers"][-1]["active_units"] == \
        au["active_units"]
    assert "per layer" in res.stdout


@pytest.mark.slow  # samples, fits a sampler and exports a trained run
def test_the_tools_work_on_a_ladder(ladder_run, tmp_path):
    run, _ = ladder_run
    for mode in ("sample", "interpolate", "traverse", "reconstruct", "visualize_latent"):
        res = cli(sample.main, ["--exp_dir", str(run), "--mode", mode, "--save_dir", str(tmp_path / mode),
                                "--n_samples", "8", "--n_pairs", "2", "--n_interpolate", "4", "--n_traverse", "3",
                                "--kl_samples", "200"])
        assert res.returncode == 0 and any((tmp_path / mode).iterdir()), (mode, res.stderr[-2000:])
    # a lower layer traversed: a row per dimension of z_1 (12), ranked by that layer's KL, the top z by default
    res = cli(sample.main, ["--exp_dir", str(run), "--mode", "traverse", "--layer", "1", "--n_traverse", "3",
                            "--kl_samples", "200", "--save_dir", str(tmp_path / "z1")])
    assert res.returncode == 0 and (tmp_path / "z1" / "traverse.gif").is_file(), res.stderr[-2000:]
    from PIL import Image
    heights = [Image.open(tmp_path / d / "traverse.png").size[1] for d in ("traverse", "z1")]
    assert heights == [6 * 30 + 2, 12 * 30 + 2]  # rows of 28-pixel tiles with 2-pixel gaps: z_2's 6, z_1's 12
    for flags, says in ((["--layer", "3"], "--layer 3: the model has 2 stochastic layer(s)"),
                        (["--layer", "1", "--traverse_dim", "12"], "the model has layers of [12, 6] dimensions"),
                        (["--traverse_dim", "7"], "--traverse_dim 7: the top layer has 6 dimensions")):
        res = cli(sample.main, ["--exp_dir", str(run), "--mode", "traverse", *flags, "--kl_samples", "50",
                                "--save_dir", str(tmp_path / "no")])
        assert res.returncode == 2 and says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = cli(sample.main, ["--exp_dir", str(run), "--mode", "sample", "--n_samples", "4", "--temperature", "0.7",
                            "--save_dir", str(tmp_path / "warm")])
    assert res.returncode == 0 and (tmp_path / "warm" / "samples.png").is_file(), res.stderr[-2000:]
    vae = TrainedVAE.load(run)
    x = _images(4)
    # the lower layers: at their means, or drawn at a temperature from the generator (the same seed, the same images)
    cold = vae.sample(3, generator=torch.Generator().manual_seed(1))
    warm = [vae.sample(3, generator=torch.Generator().manual_seed(1), temperature=0.7) for _ in range(2)]
    assert torch.equal(warm[0], warm[1]) and not torch.allclose(warm[0], cold)
    assert torch.equal(vae.sample(3, generator=torch.Generator().manual_seed(1), temperature=0.0), cold)
    assert vae.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)
    assert vae.sample(3, sampler="gmm", options=SamplerOptions(gmm_components=2)).shape == (3, 1, 28, 28)
    # reconstructions go through every layer at its posterior mean, not the top code alone
    mu, _, below = vae.encode_layers(x)
    top_alone = vae.decode(mu)
    assert not torch.allclose(vae.reconstruct(x), top_alone)
    torch.manual_seed(0)
    api = vae.log_likelihood(x, k=10)
    torch.manual_seed(0)
    assert torch.equal(api, image_bounds(vae, x, 10, chunk=100)[0])
    res = cli(exporter.main, [str(run), str(tmp_path / "hub")])
    assert res.returncode == 0, res.stderr[-2000:]
    again = TrainedVAE.load(tmp_path / "hub")
    assert again.hierarchical and torch.equal(again.reconstruct(x), vae.reconstruct(x))


@pytest.mark.slow  # two processes
def test_a_ladder_trains_and_evaluates_under_ddp(tmp_path, real_data):
    run = tmp_path / "ddp"
    proc = run_script([str(REPO / "train_vae.py"), "-c", str(REPO / HVAE), "-e", str(run), *FAST, *SMALL,
                       "train.steps=6", "train.eval_every=6", "loss.kl_warmup_steps=3"], launcher=accel_2(), env=CPU)
    assert proc.returncode == 0 and "processes=2" in proc.stdout, proc.stderr[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6]
    assert all(math.isfinite(r["kl_1"]) and math.isfinite(r["kl_2"]) for r in rows)
    proc = run_script([str(REPO / "evaluate.py"), "--exp_dir", str(run), "--metrics", "elbo,au", "--n_test", "100",
                       "--binarize"], launcher=accel_2(), env=CPU)
    assert proc.returncode == 0, proc.stderr[-3000:]
    au = json.loads((run / "eval.json").read_text())["au"]
    assert [layer["z_dim"] for layer in au["layers"]] == [12, 6]


@pytest.mark.parametrize("overrides, says", [
    (["model.latent_dims=[]", "loss.kl_balance=false"], "needs model.latent_dims"),
    (["model.hidden=[64]"], "layers do not chain"),
    (["model.z_dim=16"], "layers do not chain"),
    (["loss.free_bits=-1"], "loss.free_bits: got -1"),
    (["loss.objective=ae", "loss.regulariser=none", "loss.kl_warmup_steps=0", "loss.kl_balance=false"],
     "loss.objective=ae cannot take a ladder"),
    (["loss.regulariser=mmd", "loss.mmd_weight=10"], "loss.regulariser=mmd cannot take a ladder"),
    (["model.net=mlp"], "which model.net=mlp does not have"),
    (["loss.kl_balance=true", "loss.kl_warmup_steps=0"], "acts during the KL warm-up"),
    (["model.latent_dims=[50]", "model.hidden=[200]", "loss.kl_balance=true"], "this model has one"),
    (["loss.objective=iwae", "loss.k=5", "loss.free_bits=1"], "reshape the ELBO's KL term"),
    (["model.conditional=true"], "no conditional form"),
])
def test_bad_ladder_configs_are_refused_in_one_line_with_nothing_written(overrides, says, tmp_path, real_data):
    res = train_cli(["-c", str(REPO / HVAE), "-e", str(tmp_path / "r"), *FAST, *overrides])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and says in res.stderr, res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # trains a plain VAE
def test_a_temperature_is_refused_for_a_one_layer_model(tiny_run):
    res = cli(sample.main, ["--exp_dir", str(tiny_run), "--mode", "sample", "--temperature", "0.5"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "has one stochastic layer" in res.stderr
    with pytest.raises(UserError, match="has one stochastic layer"):
        TrainedVAE.load(tiny_run).sample(2, temperature=0.5)


def test_other_list_keys_stay_non_empty():
    with pytest.raises(UserError, match="model.hidden: got \\[\\], expected a non-empty list"):
        load_config(None, ["model.hidden=[]"])
